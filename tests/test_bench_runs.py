"""Whole-run performance: length-grouped training batches and length-sorted decoding (kpeft's side),
and ``python -m kpeft.bench --runs`` (kpeft.train against the Trainer + PEFT script) at tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIXTURES

from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.tasks import task_class
from kpeft.training.data import epoch_order, length_grouped_order, padding_fraction, steps_per_epoch
from kpeft.training.decode import by_length

GPT2 = PACKAGED_TOKENIZERS["gpt2"]


def webnlg_train_lengths(make_cfg) -> list[int]:
    from kpeft.backbones.loading import load_tokenizer

    cfg = make_cfg("model=tiny_gpt2", f"model.tokenizer={GPT2}", "task=webnlg",
                   f"task.data_dir={FIXTURES / 'webnlg2017'}")
    task = task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model))
    task.max_positions = 1024
    return [len(e["input_ids"]) for e in task.load_splits()["train"]]


def test_length_grouping_lowers_padding_on_webnlg_and_keeps_every_example(make_cfg):
    lengths = webnlg_train_lengths(make_cfg)
    assert len(lengths) == 997  # the fixture's good lexicalisations
    batch = 16
    for epoch in range(3):
        plain = epoch_order(len(lengths), seed=1, epoch=epoch)
        grouped = length_grouped_order(lengths, seed=1, epoch=epoch, global_batch=batch)
        assert sorted(grouped) == list(range(len(lengths)))  # the same examples, each once
        assert grouped == length_grouped_order(lengths, seed=1, epoch=epoch, global_batch=batch)  # deterministic
        pad_plain, pad_grouped = padding_fraction(lengths, plain, batch), padding_fraction(lengths, grouped, batch)
        assert pad_plain > 0.25 and pad_grouped < 0.05, (pad_plain, pad_grouped)
    # epochs differ, and the order of the batches is shuffled (not longest first throughout)
    e0, e1 = (length_grouped_order(lengths, 1, e, batch) for e in (0, 1))
    assert e0 != e1
    firsts = [max(lengths[i] for i in e0[s * batch:(s + 1) * batch]) for s in range(steps_per_epoch(len(e0), batch))]
    assert firsts != sorted(firsts, reverse=True)


def test_length_grouping_keeps_the_short_last_batch_last():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    order = length_grouped_order(lengths, seed=0, epoch=0, global_batch=3)
    assert sorted(order) == list(range(7))
    assert len({lengths[i] for i in order[-1:]}) == 1  # one example left over, at the end
    assert padding_fraction([2, 4], [0, 1], 2) == pytest.approx(0.25)  # 6 real tokens of 8


def test_trainer_groups_generation_tasks_only(make_cfg, tmp_path):
    from kpeft.train import build
    from kpeft.training.loop import LoopState, Trainer, make_accelerator

    base = ("model=tiny_gpt2", f"model.tokenizer={GPT2}", "method=lora", "budget=tiny", "task=webnlg",
            f"task.data_dir={FIXTURES / 'webnlg2017'}", "task.options.max_train_examples=64")
    for extra, grouped in (((), True), (("train.group_by_length=false",), False)):
        cfg = make_cfg(*base, *extra)
        adapted, task, splits = build(cfg)
        trainer = Trainer(cfg, adapted, task, splits, tmp_path / "run", make_accelerator(cfg.train))
        assert trainer.group_by_length is grouped
        assert sorted(trainer.epoch_order(0)) == list(range(64))
        summary = trainer.summary(LoopState())
        assert summary["group_by_length"] is grouped
        assert (summary["padding_fraction"] < 0.15) is grouped


def test_decoding_by_length_restores_the_order():
    prompts = [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]]
    seen = []

    def run(batch, kw):
        seen.append(([len(p) for p in batch], kw["token_types"]))
        return [list(reversed(p)) for p in batch]

    out = by_length(run, prompts, {"token_types": [[0] * len(p) for p in prompts], "max_new_tokens": 3})
    assert out == [[2, 1], [6, 5, 4, 3], [7], [10, 9, 8]]
    assert seen[0][0] == [4, 3, 2, 1] and [len(t) for t in seen[0][1]] == [4, 3, 2, 1]


def test_decode_sorted_gives_the_unsorted_tokens():
    from helpers import tiny_model

    from kpeft.training.decode import decode, greedy_decode

    model = tiny_model("gpt2").eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 9, 5, 12, 4)]
    kwargs = {"max_new_tokens": 4, "pad_id": 0, "batch_size": 2}
    assert decode(model, prompts, **kwargs) == [greedy_decode(model, [p], **kwargs)[0] for p in prompts]


def test_bench_runs_quick_emits_every_key(tmp_path, capsys):
    from kpeft.bench.__main__ import main

    res = main(["--runs", "--quick", "--out", str(tmp_path)])
    for job in ("sst2_minilm", "webnlg_tiny"):
        assert res["run_ratio_vs_hf_trainer"][job] > 0
        assert set(res["phase_ratio_vs_hf_trainer"][job]) == {"startup", "data", "train", "eval", "scoring"}
        assert all(v > 0 for v in res["phase_ratio_vs_hf_trainer"][job].values())
        fm = res["final_metric"][job]
        assert 0 <= fm["kpeft"] <= 100 and 0 <= fm["hf_trainer"] <= 100
        for side in ("kpeft", "hf_trainer"):
            phases = res["seconds"][job][side]["1x"]
            assert sum(phases[p] for p in ("startup", "data", "train", "eval", "scoring", "exit")) == \
                pytest.approx(phases["wall"], abs=0.05)
    pad = res["padding_fraction"]["webnlg_tiny"]
    assert pad["group_by_length"] is True and 0 <= pad["kpeft"] < pad["without_grouping"]
    assert res["padding_fraction"]["sst2_minilm"]["group_by_length"] is False
    saved = json.loads((tmp_path / "runs-cpu-1t.quick.json").read_text())
    assert saved["run_ratio_vs_hf_trainer"] == res["run_ratio_vs_hf_trainer"]
    assert {"commit", "dirty"} <= set(saved["provenance"]["git"]) and len(saved["provenance"]["lock"]["sha256"]) == 64
    assert (tmp_path / "runs-cpu-1t.quick.md").read_text().startswith("Whole runs")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final_metric"] == res["final_metric"]


def test_bench_runs_refuses_unknown_jobs(capsys):
    from kpeft.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--runs", "--jobs", "mnli_bert"])
    assert exc.value.code != 0
    assert "unknown --jobs entry 'mnli_bert'" in capsys.readouterr().err


def test_classifier_evaluation_forwards_each_batch_once_with_the_separate_passes_numbers(make_cfg, tmp_path):
    from kpeft.train import build
    from kpeft.training.loop import Trainer, make_accelerator

    cfg = make_cfg("model=tiny_bert", "task=demo_sentiment", "method=lora", "budget=tiny", "task.options.n_train=32",
                   "task.options.n_test=70", "task.options.n_val=8", "train.eval_batch_size=32")
    adapted, task, splits = build(cfg)
    trainer = Trainer(cfg, adapted, task, splits, tmp_path, make_accelerator(cfg.train))
    calls = []
    hook = adapted.model.register_forward_hook(lambda *a: calls.append(1))
    metrics = trainer.evaluate("test", save_examples=True)
    assert len(calls) == 3  # 70 examples in batches of 32: one forward each
    hook.remove()
    assert metrics["loss"] == pytest.approx(trainer.evaluate_loss("test"), rel=1e-9)
    rows = [json.loads(line) for line in (tmp_path / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(70))
    assert metrics["accuracy"] == pytest.approx(100.0 * sum(r["score"] for r in rows) / 70)
