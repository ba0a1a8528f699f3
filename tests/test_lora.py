"""LoRA (Hu et al. 2021) on the four backbone families: placement, the merged weights, the fused
GPT-2 ``c_attn`` column blocks, equality with PEFT's LoRA, init, trainability, dropout. The generic
checks (zero-init = frozen, merge round trip, save/load, cache, padding, gradients): tests/test_matrix.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import FAMILIES, config, inputs, lora, output, randomise, tiny_model

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.methods.base import AdaptedProjection
from kpeft.methods.lowrank import LoRA

ALL = list(FAMILIES)
# Projections LoRA adapts by default: q and v of every self-attention module.
N_SELF_ATTENTIONS = {"gpt2": 2, "roberta_cls": 2, "roberta_base": 2, "t5": 4, "llama": 2}


def frozen_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def lora_branches(adapted) -> list[LoRA]:
    return [c for c in adapted.all_components() if isinstance(c, LoRA)]


@pytest.mark.parametrize("family", ALL)
def test_lora_adapts_q_and_v_of_every_self_attention_and_only_b_starts_at_zero(family):
    # (that it then gives the frozen model's outputs, and merges, is checked in tests/test_matrix.py)
    adapted = lora(tiny_model(family))
    branches = lora_branches(adapted)
    assert len(branches) == 2 * N_SELF_ATTENTIONS[family]
    assert all(torch.count_nonzero(b.lora_B) == 0 for b in branches)
    assert all(b.lora_bias is None or torch.count_nonzero(b.lora_bias) == 0 for b in branches)
    assert all(torch.count_nonzero(b.lora_A) > 0 for b in branches)  # only B is zero


@pytest.mark.parametrize("family", ["roberta_cls", "t5", "llama"])  # GPT-2's fused c_attn: below
def test_merge_changes_only_the_q_and_v_weights(family):
    model = tiny_model(family)
    adapted = lora(model)
    randomise(adapted)
    original = frozen_params(model)
    adapted.merge()
    changed = {n for n, w in frozen_params(model).items() if not torch.equal(w, original[n])}
    assert changed and all(any(k in n for k in ("query", "value", ".q.", ".v.", "q_proj", "v_proj")) for n in changed)


def test_scaling_follows_the_fidelity_switch():
    # s = α/r (paper); the official code uses s = 1 when α <= 1.5 (docs/deviations.md, item 2).
    for fidelity, alpha, expected in [("paper", 32, 8.0), ("paper", 1, 0.25), ("code", 1, 1.0), ("code", 32, 8.0)]:
        adapted = lora(tiny_model("llama"), f"method.components.lora.alpha={alpha}", r=4, fidelity=fidelity)
        assert {b.scaling for b in lora_branches(adapted)} == {expected}


def test_delta_weight_is_the_row_convention_product():
    model = tiny_model("llama")
    adapted = lora(model, r=3)
    randomise(adapted)
    branch = lora_branches(adapted)[1]  # layer 0, v_proj: 32 -> 16 (2 kv heads × 8)
    assert (branch.d_in, branch.d_out) == (32, 16)
    s = 32 / 3
    expected = s * branch.lora_A.t() @ branch.lora_B.t()  # (d_in, d_out) = s·(B·A)ᵀ
    torch.testing.assert_close(branch.delta_weight(), expected)
    x = torch.randn(5, 32)
    torch.testing.assert_close(branch(x), x @ expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- GPT-2's fused c_attn


def _c_attn_outputs(model: torch.nn.Module, batch) -> torch.Tensor:
    seen = []
    handle = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(o))
    output(model, batch)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(("target", "block"), [("q", 0), ("v", 2)])
def test_gpt2_lora_touches_only_its_column_block_of_c_attn(target, block):
    model = tiny_model("gpt2")
    d = model.config.n_embd
    twin = copy.deepcopy(model)
    batch = inputs("gpt2")
    adapted = lora(model, f"method.components.lora.targets=[{target}]")
    randomise(adapted)
    base_out, out = _c_attn_outputs(twin, batch), _c_attn_outputs(model, batch)
    assert out.shape[-1] == 3 * d
    cols = torch.arange(3 * d)
    inside = (cols >= block * d) & (cols < (block + 1) * d)
    assert torch.equal(out[..., ~inside], base_out[..., ~inside])
    assert (out[..., inside] - base_out[..., inside]).abs().amin(dim=-1).gt(0).any()


def test_gpt2_merge_changes_only_the_q_and_v_column_blocks():
    model = tiny_model("gpt2")
    d = model.config.n_embd
    adapted = lora(model)  # targets q, v
    randomise(adapted)
    attn = model.transformer.h[1].attn
    w0, b0 = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    wo = attn.c_proj.weight.detach().clone()
    adapted.merge()
    dw, db = attn.c_attn.weight.detach() - w0, attn.c_attn.bias.detach() - b0
    assert dw.shape == (d, 3 * d)
    assert torch.count_nonzero(dw[:, d : 2 * d]) == 0 and torch.count_nonzero(db[d : 2 * d]) == 0  # k
    q, v = lora_branches(adapted)[2:4]  # layer 1: q then v
    torch.testing.assert_close(dw[:, :d], q.delta_weight(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw[:, 2 * d :], v.delta_weight(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db[:d], q.scaling * q.lora_bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db[2 * d :], v.scaling * v.lora_bias, rtol=1e-5, atol=1e-6)
    assert torch.equal(attn.c_proj.weight, wo) and not isinstance(attn.c_proj, AdaptedProjection)  # W_o


# ---------------------------------------------------------------- against PEFT


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations PEFT triggers
@pytest.mark.parametrize(
    ("family", "targets", "with_bias"),
    [
        ("llama", ["q_proj", "v_proj"], False),
        ("roberta_cls", ["query", "value"], True),
        ("roberta_base", ["query", "value"], False),
    ],
)
def test_our_lora_equals_peft_lora_given_the_same_weights(family, targets, with_bias):
    peft = pytest.importorskip("peft")
    model = tiny_model(family)
    twin = copy.deepcopy(model)
    r, alpha = 4, 16
    adapted = lora(model, f"method.components.lora.alpha={alpha}",
                   f"method.components.lora.train_bias={str(with_bias).lower()}", r=r)
    randomise(adapted)
    peft_model = peft.get_peft_model(
        twin,
        peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, lora_bias=with_bias),
    ).eval()
    peft_modules = dict(peft_model.named_modules())
    copied = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, AdaptedProjection):
                continue
            (ours,) = module.branches
            theirs = peft_modules[f"base_model.model.{name}"]
            assert theirs.scaling["default"] == ours.scaling == alpha / r
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
            # PEFT's lora_bias lives on lora_B and is scaled too: s·(B A x + β), as ours.
            assert (theirs.lora_B["default"].bias is not None) == with_bias == (ours.lora_bias is not None)
            if with_bias:
                theirs.lora_B["default"].bias.copy_(ours.lora_bias)
            copied += 1
    assert copied == 2 * model.config.num_hidden_layers
    batch = inputs(family)
    torch.testing.assert_close(output(model, batch), output(peft_model, batch), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- init


def test_kaiming_zero_init():
    model = tiny_model("llama")
    adapted = lora(model, "method.components.lora.init=kaiming_zero", r=8)
    for b in lora_branches(adapted):
        bound = 1 / math.sqrt(b.d_in)
        assert b.lora_A.abs().max() <= bound
        assert b.lora_A.abs().max() > 0.8 * bound  # uniform over the whole interval
        assert b.lora_A.min() < 0 < b.lora_A.max()
        assert torch.count_nonzero(b.lora_B) == 0
    # The same bound as torch's Kaiming-uniform with a = √5 (loralib / nn.Linear).
    t = torch.empty(10_000, 32)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    assert t.abs().max() <= 1 / math.sqrt(32) and t.abs().max() > 0.99 / math.sqrt(32)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_houlsby_init_is_small_and_nonzero(family):
    adapted = lora(tiny_model(family), "method.components.lora.init=houlsby", r=8)
    values = torch.cat([p.detach().flatten() for b in lora_branches(adapted) for p in b.parameters()])
    assert values.numel() > 1000
    assert values.abs().max() < 0.02 and torch.count_nonzero(values) == values.numel()
    assert 0.006 < values.std() < 0.011  # fmod(N(0,1), 2) · 0.01


def test_zero_zero_init_is_all_zero():
    adapted = lora(tiny_model("gpt2"), "method.components.lora.init=zero_zero")
    assert all(torch.count_nonzero(p) == 0 for b in lora_branches(adapted) for p in b.parameters())


# ---------------------------------------------------------------- trainability and counting


@pytest.mark.parametrize("family", ALL)
def test_only_the_lora_tensors_train(family):
    model = tiny_model(family)
    anatomy = describe(model)
    head = {id(p) for p in anatomy.task_head_params}
    head_numel = sum(p.numel() for p in anatomy.task_head_params)
    total = sum(p.numel() for p in model.parameters()) - head_numel
    adapted = lora(model, r=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in head}
    assert names and all(".lora_" in n for n in names)
    assert {n for n, _ in model.named_parameters() if ".lora_" in n} == names
    assert all(p.requires_grad for p in anatomy.task_head_params)
    assert (head_numel > 0) == (family == "roberta_cls")
    # The count: per adapted projection r·d_in + r·d_out (+ d_out for β where it has a bias).
    has_bias = family in ("gpt2", "roberta_cls", "roberta_base")
    expected = 0
    for _, att in anatomy.attentions("self"):
        for proj in (att.q, att.v):
            expected += 4 * (proj.d_in + proj.d_out) + (proj.d_out if has_bias else 0)
    count = adapted.count()
    assert (count.total, count.trainable, count.stored, count.uncounted) == (total, expected, expected, head_numel)


def test_train_bias_switch():
    on = lora(tiny_model("llama"), "method.components.lora.train_bias=true")
    off = lora(tiny_model("gpt2"), "method.components.lora.train_bias=false")
    assert all(b.lora_bias is not None for b in lora_branches(on))
    assert all(b.lora_bias is None for b in lora_branches(off))
    # A β on a bias-free projection trains but cannot be merged: refused before any weight moves.
    randomise(on)
    before = frozen_params(on.model)
    assert not on.mergeable
    with pytest.raises(ValueError, match="train_bias=false"):
        on.merge()
    assert not on.merged
    assert all(torch.equal(w, before[n]) for n, w in frozen_params(on.model).items())


def test_cross_attention_is_adapted_only_when_asked():
    self_only = lora(tiny_model("t5"))
    both = lora(tiny_model("t5"), "method.components.lora.attention=all")
    cross = lora(tiny_model("t5"), "method.components.lora.attention=cross")
    assert len(lora_branches(self_only)) == 2 * 4 and len(lora_branches(cross)) == 2 * 2
    assert len(lora_branches(both)) == 2 * 6
    assert both.count().trainable == self_only.count().trainable + cross.count().trainable


# ---------------------------------------------------------------- dropout


def test_lora_dropout_acts_in_training_only():
    nodrop = ("+model.architecture.resid_pdrop=0", "+model.architecture.embd_pdrop=0",
              "+model.architecture.attn_pdrop=0")
    cfg = config("model=tiny_gpt2", *nodrop)
    batch = inputs("gpt2")

    def build(p: float):
        model = load_model(cfg.model, "causal_lm", seed=0)
        adapted = lora(model, dropout=p)
        randomise(adapted)
        return model

    model = build(0.5)
    model.train()
    with torch.no_grad():
        a, b = model(**batch).logits, model(**batch).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(output(model, batch), output(model, batch))
    # Without LoRA dropout, training-mode outputs repeat: the difference above is LoRA's dropout.
    quiet = build(0.0).train()
    with torch.no_grad():
        assert torch.equal(quiet(**batch).logits, quiet(**batch).logits)
