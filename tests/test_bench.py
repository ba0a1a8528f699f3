"""``python -m kpeft.bench`` and the speed fixes it measures: the quick run emits every key, its
clocks / memory accounting / ratios are checked against hand-computed values, and every optimised
path equals the straightforward one (target-only LM logits, out-of-place column-block adds,
the CPU branch dropout, KronA's reshape product)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import config, method_cfg, tiny_model
from omegaconf import OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.bench import report
from kpeft.bench.__main__ import main
from kpeft.bench.measure import kron_paths, train_step
from kpeft.bench.timing import Clock, peak_bytes, resident_bytes, round_robin
from kpeft.bench.zoo import build_method, shared_copy
from kpeft.methods import apply_method
from kpeft.methods.base import add_blocks
from kpeft.methods.dropout import BranchDropout, branch_dropout
from kpeft.tasks.base import IGNORE, Task

LM = Task(OmegaConf.create({"name": "lm", "kind": "causal_lm"}))


def lm_batch(vocab: int = 256) -> dict[str, torch.Tensor]:
    """Three rows: a prompt then a target, one right-padded, one with nothing scored."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[1, 7:] = IGNORE
    labels[2] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- target-only LM logits
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lm_loss_runs_the_head_on_target_positions_only_and_equals_the_full_logits_loss(family):
    model = tiny_model(family).train()  # dropout on: both paths draw the same masks
    batch = lm_batch()
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1]))
    torch.manual_seed(1)
    loss, n = LM.loss(model, batch)
    hook.remove()
    loss.backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    torch.manual_seed(1)
    logits, labels = LM.logits_and_labels(model, batch)  # (3, 8, V): every position
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    full.backward()
    assert n == 5 + 3 + 0 == int((labels != IGNORE).sum())  # tokens 4..8, 4..6, none
    assert head_rows == [torch.Size([n])]  # the LM head saw only the scored positions
    assert torch.allclose(loss, full, rtol=1e-6, atol=1e-6)
    for k, p in model.named_parameters():
        assert torch.allclose(fast[k], p.grad, rtol=1e-5, atol=1e-7), k


def test_lm_metrics_equal_the_full_logits_accuracy():
    model = tiny_model("gpt2").eval()
    batch = lm_batch()
    logits, labels = LM.logits_and_labels(model, batch)
    scored = labels != IGNORE
    expected = float((logits.argmax(-1)[scored] == labels[scored]).sum())
    assert LM.batch_metrics(model, batch) == {"correct": expected, "n": 8.0}


# ---------------------------------------------------------------- method speed fixes
def test_add_blocks_equals_in_place_block_adds_and_hands_views_of_the_gradient():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 12, generator=gen, requires_grad=True)
    deltas = {(0, 4): torch.randn(2, 3, 4, generator=gen), (8, 12): torch.randn(2, 3, 4, generator=gen),
              (0, 12): torch.randn(2, 3, 12, generator=gen)}  # overlapping: a second pass
    for d in deltas.values():
        d.requires_grad_(True)
    expected = y.detach().clone()
    expected[..., 0:4] += deltas[(0, 4)].detach()
    expected[..., 8:12] += deltas[(8, 12)].detach()
    expected += deltas[(0, 12)].detach()
    out = add_blocks(y, deltas)
    assert torch.allclose(out, expected)
    grad = torch.randn(2, 3, 12, generator=gen)
    out.backward(grad)
    assert torch.equal(y.grad, grad) and torch.equal(deltas[(0, 12)].grad, grad)
    assert torch.equal(deltas[(0, 4)].grad, grad[..., :4]) and torch.equal(deltas[(8, 12)].grad, grad[..., 8:])


def test_branch_dropout_is_inverted_bernoulli_dropout():
    drop = BranchDropout(0.25)
    assert isinstance(drop, torch.nn.Dropout) and isinstance(branch_dropout(0.0), torch.nn.Identity)
    x = torch.full((1000, 1000), 3.0, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.003  # 1e6 draws: sd 0.0004
    assert torch.allclose(y[kept], torch.tensor(4.0))  # 3 / (1 - 0.25)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() / 0.75)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the default generator: seeds reproduce the mask
    drop.eval()
    assert drop(x) is x


# ---------------------------------------------------------------- the benchmark's parts
def test_round_robin_rotates_the_order_every_repeat():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = round_robin(fns, repeats=3, clock=Clock(torch.device("cpu")), warmup=1)
    assert calls == list("abc" "abc" "bca" "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_peak_bytes_is_the_allocator_peak_of_the_call():
    def work():
        a = torch.ones(250_000)  # 1,000,000 bytes
        b = torch.ones(500_000)  # 2,000,000: 3 MB live
        del a, b
        c = torch.ones(125_000)  # 500,000
        return c

    peak = peak_bytes(work, torch.device("cpu"))
    assert 3_000_000 <= peak < 3_000_000 + 4096


def test_resident_bytes_counts_each_storage_once_and_the_optimizer_state():
    model = tiny_model("gpt2")
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # wte and the LM head are tied
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert resident_bytes(model) == 4 * sum(unique.values())
    params = [model.transformer.ln_f.weight, model.transformer.ln_f.bias]
    opt = torch.optim.AdamW(params)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    # exp_avg and exp_avg_sq per tensor (32 floats each) and a float32 step counter each
    assert resident_bytes(model, opt) == 4 * sum(unique.values()) + 2 * (2 * 4 * 32 + 4)


def test_kron_paths_compute_the_same_product_and_gradients():
    fns = kron_paths((4, 8), (8, 4), tokens=5, device=torch.device("cpu"))
    reshape, dense = fns["reshape"](), fns["materialised"]()
    assert reshape.shape == (5, 32) and torch.allclose(reshape, dense, atol=1e-4)
    assert torch.allclose(fns["reshape_forward"](), fns["precomputed_forward"](), atol=1e-4)


def test_methods_share_frozen_storage_and_own_what_they_train():
    cfg = config("model=tiny_gpt2")
    base = load_model(cfg.model, "causal_lm", seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    copy = shared_copy(base)
    assert all(a.data_ptr() == b.data_ptr() and a is not b for a, b in zip(base.parameters(), copy.parameters()))
    lora = build_method(base, "tiny_gpt2", "lora")
    ft = build_method(base, "tiny_gpt2", "finetune")
    c_attn = lora.model.transformer.h[0].attn.c_attn
    assert c_attn.weight.data_ptr() == base.transformer.h[0].attn.c_attn.weight.data_ptr()
    assert ft.model.lm_head.weight is ft.model.transformer.wte.weight  # still tied
    shared = {p.data_ptr() for p in base.parameters()}
    assert not any(p.data_ptr() in shared for p in ft.model.parameters())
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[IGNORE, IGNORE, 7, 8]])}
    for entry in (ft, lora):
        train_step(entry, batch)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # nobody wrote into the backbone


def test_ratios_targets_and_table2_from_hand_numbers():
    out = report.ratios(
        ["finetune", "lora", "adapter"], ["lora"],
        train_s={"peft_lora": 2.0, "finetune": 4.0, "lora": 2.2, "adapter": 2.6},
        peak={"peft_lora": 38, "finetune": 100, "lora": 40, "adapter": 81},
        latency_s={"backbone": 1.0, "finetune": 1.1, "lora": 1.2, "adapter": 1.5},
        merged_s={"backbone": 2.0, "finetune": 2.2, "lora": 2.02},
    )
    assert out["train_ratio_vs_peft_lora"] == {"finetune": 2.0, "lora": 1.1, "adapter": 1.3}
    assert out["mem_ratio_vs_finetune"] == {"lora": 0.4, "adapter": 0.81, "peft_lora": 0.38}
    assert out["merged_latency_ratio"] == {"lora": 1.01}
    assert out["unmerged_latency_ratio"] == {"finetune": 1.1, "lora": 1.2, "adapter": 1.5}
    assert out["table2"] == {"finetune": {"latency": 100.0, "training_time": 100.0},
                             "lora": {"latency": 91.8, "training_time": 55.0},  # merged: 2.02 / 2.2
                             "adapter": {"latency": 136.4, "training_time": 65.0}}
    out.update(decode_speedup_vs_naive=10.0, decode_ratio_vs_hf_generate=0.99, krona_reshape_speedup=1.0)
    met = {k: v["met"] for k, v in report.check_targets(out).items()}
    assert met == {
        "train_ratio_vs_peft_lora.lora": True,  # 1.10 ≤ 1.10
        "train_ratio_vs_peft_lora.adapter": False,  # 1.30 > 1.25; full fine-tuning has no target
        "mem_ratio_vs_finetune.lora": True, "mem_ratio_vs_finetune.adapter": False,
        "mem_ratio_vs_finetune.peft_lora": True, "merged_latency_ratio.lora": True,
        "decode_speedup_vs_naive": True, "decode_ratio_vs_hf_generate": False, "krona_reshape_speedup": False,
    }


# ---------------------------------------------------------------- the CLI
QUICK_METHODS = ("finetune", "bitfit", "lora", "kernel_mix_qvo", "krona", "inducer", "prefix", "adapter")


def test_quick_bench_prints_and_saves_every_key(tmp_path, capsys):
    result = main(["--quick", "--methods", ",".join(QUICK_METHODS), "--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / f"{result['setup']['host_kind']}.quick.json").read_text())
    assert (tmp_path / f"{printed['setup']['host_kind']}.quick.md").read_text().startswith("### `python -m kpeft.bench`")
    assert printed["skipped"] == {} and printed["setup"]["methods"] == list(QUICK_METHODS)
    assert {"commit", "dirty"} <= set(printed["provenance"]["git"]) and printed["provenance"]["versions"]["torch"]
    assert set(printed["train_ratio_vs_peft_lora"]) == set(QUICK_METHODS)
    assert set(printed["mem_ratio_vs_finetune"]) == set(QUICK_METHODS) - {"finetune"} | {"peft_lora"}
    assert set(printed["merged_latency_ratio"]) == {"lora", "kernel_mix_qvo", "krona"}
    assert set(printed["unmerged_latency_ratio"]) == set(QUICK_METHODS)
    assert printed["table2"]["finetune"] == {"latency": 100.0, "training_time": 100.0}
    assert set(printed["table2"]) == set(QUICK_METHODS)
    assert set(printed["gradient_checkpointing_mem_ratio"]) == {"lora", "inducer", "prefix"}
    assert all(v > 0 for v in printed["gradient_checkpointing_mem_ratio"].values())
    for key in ("decode_speedup_vs_naive", "decode_ratio_vs_hf_generate", "krona_reshape_speedup"):
        assert printed[key] > 0
    assert printed["decode_match_naive"] == 1.0 and printed["decode_match_hf_generate"] == 1.0  # same tokens
    assert printed["setup"]["models"]["krona"]["budget"] == "t5_glue"  # no intermediate size: the next budget
    assert printed["setup"]["krona"]["a_shape"] == [4, 8]  # T5 shapes do not fit width 32: near-square ones
    assert all(set(v) == {"value", "target", "met"} for v in printed["targets"].values())
    assert len(printed["targets"]) == 6 + 8 + 3 + 3  # train (no finetune/bitfit), memory, merged, decode/KronA


def test_prefix_table_split_once_per_forward_gives_the_gradients_of_a_plain_table():
    """Training reads one table per forward, split into per-layer views: the loss and the MLP's
    gradients equal those of the same prefixes as a plain table, chained through the MLP."""
    cfg = config("model=tiny_gpt2")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])

    def prefixed(*overrides):
        model = load_model(cfg.model, "causal_lm", seed=0).eval()  # no dropout; gradients still on
        adapted = apply_method(model, describe(model), method_cfg("prefix", *overrides, budget="small"))
        return model, adapted.components["prefix"][0]

    model, prefix = prefixed()
    logits = model(input_ids=ids).logits
    with torch.no_grad():  # evaluation slices each layer's block out of a cached table
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-6)
    loss = logits.square().mean()
    loss.backward()
    plain_model, plain = prefixed("method.components.prefix.reparam=false")
    with torch.no_grad():
        plain.table.copy_(prefix.prefix_table())
    plain_loss = plain_model(input_ids=ids).logits.square().mean()
    plain_loss.backward()
    assert torch.allclose(loss, plain_loss, rtol=1e-6)
    params = [p for p in prefix.parameters()]
    expected = torch.autograd.grad(prefix.prefix_table(), params, grad_outputs=plain.table.grad)
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad, e, rtol=1e-5, atol=1e-8)
