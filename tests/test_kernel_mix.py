"""Kernel-wise / Kernel-wise-lite / Kernel-mix / Kernel-mix-lite ([KM] §4) on the
four backbone families: init, merging with the lite key-bias term, equality with a naive per-head
reference, head-specificity, the lite trick, T5 cross-attention (cache too), GQA, the fidelity switch,
the papers' parameter counts, training. The generic checks (zero-init = frozen, merge round trip,
KV-cache decoding, save/load, padding, gradients) run on every variant in tests/test_matrix.py."""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import math

import pytest
import torch
from helpers import (
    FAMILIES,
    config,
    inputs,
    method_cfg,
    output,
    randomise,
    tiny_model,
)
from omegaconf import OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.compose import compose
from kpeft.count import main as count_main
from kpeft.errors import KpeftError
from kpeft.methods import AdaptedModel, apply_method, kernelwise
from kpeft.methods.base import AdaptedProjection
from kpeft.methods.kernelwise import HeadwiseBranch, KernelWise, KernelWiseLite, KernelWiseOut
from kpeft.methods.lowrank import LoRA

# Each method and a budget that sizes it (Table B.5).
METHODS = {
    "kernel_mix_lite_qv": "small",
    "kernel_mix_qvo": "intermediate",
    "kernel_wise_lite_qv": "small",
    "kernel_wise_mq": "intermediate",
    "kernel_wise_mv": "intermediate",
    "kernel_wise_qvo": "intermediate",
}
FOUR = ["gpt2", "roberta_cls", "t5", "llama"]
KEY_ATTR = {"bert": "key", "t5": "k", "llama": "k_proj"}  # the Linear key projection per family


def component(method: str) -> str:
    return "kernel_mix" if method.startswith("kernel_mix") else "kernel_wise"


def kmix(model, method: str, *overrides: str, budget: str | None = None, dropout: float = 0.0,
         fidelity: str = "paper") -> AdaptedModel:
    """Install the real method YAML (no dropout by default) on `model`."""
    c = f"method.components.{component(method)}"
    mcfg = method_cfg(method, f"{c}.dropout={dropout}", *(f"{c}.{o}" for o in overrides),
                      budget=budget or METHODS[method])
    return apply_method(model, describe(model), mcfg, fidelity)


def branches(adapted: AdaptedModel, cls=HeadwiseBranch) -> list:
    return [c for c in adapted.all_components() if isinstance(c, cls)]


# ---------------------------------------------------------------- the naive per-head reference


def key_block(att, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen key weight (row convention, (d, H_kv·p)) and bias, read from the module itself."""
    mod = att.module
    if family == "gpt2":
        d = mod.c_attn.weight.shape[0]
        return mod.c_attn.weight[:, d : 2 * d], mod.c_attn.bias[d : 2 * d]
    lin = getattr(mod, KEY_ATTR[family])
    lin = getattr(lin, "base", lin)
    return lin.weight.t(), lin.bias


def naive_delta(branch, att, family: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW (row convention) and Δb of one branch, written plainly with a loop over heads."""
    if isinstance(branch, LoRA):
        return branch.scaling * branch.lora_A.t() @ branch.lora_B.t(), None
    H, p, r, s = branch.heads, branch.head_dim, branch.r, branch.scaling
    dw = torch.zeros(branch.d_in, branch.d_out)
    db = torch.zeros(branch.d_out)
    for h in range(H):
        c = slice(h * p, (h + 1) * p)
        if isinstance(branch, KernelWise):
            B, A = branch.head_in[h].t(), branch.head_out[h]  # (d, r), (r, p)
            dw[:, c] = B @ A
        elif isinstance(branch, KernelWiseOut):
            At, Bt = branch.head_in[h], branch.head_out[h * r : (h + 1) * r]  # (p, r), (r, d)
            dw[c, :] = At @ Bt
        else:  # lite: the key block of KV head ⌊h·H_kv/H⌋ as basis
            wk, bk = key_block(att, family)
            g = h * att.num_kv_heads // H
            kc = slice(g * p, (g + 1) * p)
            BkA = branch.head_in[h] @ branch.head_out[h]  # (p, r) (r, p)
            dw[:, c] = wk[:, kc] @ BkA
            if bk is not None and branch.key_bias:
                db[c] = bk[kc] @ BkA
    if branch.head_bias is not None:
        db = db + branch.head_bias
    has_db = branch.head_bias is not None or (isinstance(branch, KernelWiseLite) and branch.key_bias)
    return s * dw, (s * db if has_db else None)


def adapted_blocks(adapted: AdaptedModel):
    """(attention, AdaptedProjection, branches on it) for every adapted projection."""
    for _, att in adapted.anatomy.attentions("all"):
        seen = set()
        for name in ("q", "k", "v", "o"):
            proj = att.projection(name)
            mod = getattr(proj.parent, proj.attr)
            if isinstance(mod, AdaptedProjection) and id(mod) not in seen:
                seen.add(id(mod))
                yield att, mod


# ---------------------------------------------------------------- zero delta, merge


@functools.cache
def _tiny(family: str) -> torch.nn.Module:
    return tiny_model(family)


@functools.cache
def _default_cfg(method: str):
    return method_cfg(method, budget=METHODS[method])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FOUR)
def test_only_the_output_side_factors_start_at_zero(family, method):
    # (that the variant then gives the frozen model's outputs, and merges, is checked in tests/test_matrix.py)
    model = copy.deepcopy(_tiny(family))
    adapted = apply_method(model, describe(model), _default_cfg(method))
    heads = branches(adapted)
    assert heads and all(torch.count_nonzero(b.head_out) == 0 for b in heads)
    assert all(torch.count_nonzero(b.head_in) > 0 for b in heads)  # only the output side is zero
    assert all(b.head_bias is None or torch.count_nonzero(b.head_bias) == 0 for b in heads)
    assert (all(b.head_bias is None for b in heads)) == (family in ("t5", "llama"))  # auto: no β there
    assert all(torch.count_nonzero(b.lora_B) == 0 for b in branches(adapted, LoRA))


@pytest.mark.parametrize("family", ["gpt2", "roberta_cls"])
@pytest.mark.parametrize("key_bias", [True, False])
@pytest.mark.parametrize("fidelity", ["paper", "code"])
def test_merge_with_and_without_the_lite_key_bias_term(family, key_bias, fidelity):
    model = tiny_model(family)
    batch = inputs(family)
    adapted = kmix(model, "kernel_mix_qvo", f"lite_basis_includes_key_bias={str(key_bias).lower()}",
                   fidelity=fidelity)
    lites = branches(adapted, KernelWiseLite)
    assert lites and all(b.key_bias == (key_bias or fidelity == "code") for b in lites)
    randomise(adapted)
    unmerged = output(model, batch)
    adapted.merge()
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_t5_cross_attention_lite_v_merges_and_lite_q_is_refused():
    model = tiny_model("t5")
    batch = inputs("t5")
    adapted = kmix(model, "kernel_mix_qvo", "attention=all")  # q full, v lite, o: cross too
    cross = [att for _, att in adapted.anatomy.attentions("cross")]
    assert cross and all(isinstance(att.v.module, torch.nn.Linear) for att in cross)
    assert sum(isinstance(b, KernelWiseLite) for b in adapted.all_components()) == 6  # 4 self + 2 cross
    randomise(adapted)
    unmerged = output(model, batch)
    adapted.merge()
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)

    for method in ("kernel_mix_lite_qv", "kernel_wise_lite_qv"):
        fresh = tiny_model("t5")
        before = {n: p.clone() for n, p in fresh.named_parameters()}
        with pytest.raises(KpeftError, match="Kernel-wise-lite on W_q is undefined in cross-attention") as info:
            kmix(fresh, method, "attention=all")
        assert "\n" not in str(info.value)
        assert not any(isinstance(m, AdaptedProjection) for m in fresh.modules())  # nothing installed
        assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())
    # Cross-attention with lite on V only is fine.
    kmix(tiny_model("t5"), "kernel_mix_lite_qv", "attention=cross", "q.basis=full")


# ---------------------------------------------------------------- against the naive reference


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FOUR)
def test_batched_branches_equal_the_naive_per_head_reference(family, method):
    model = tiny_model(family)
    fam = describe(model).family
    adapted = kmix(model, method, "train_bias=true" if family in ("gpt2", "roberta_cls") else "train_bias=false")
    randomise(adapted)
    g = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        for att, mod in adapted_blocks(adapted):
            x = torch.randn(2, 5, mod.branches[0].d_in, generator=g)
            base = mod.base(x)
            expected = base.clone()
            for b in mod.branches:
                dw, db = naive_delta(b, att, fam)
                torch.testing.assert_close(b.delta_weight(), dw, rtol=1e-5, atol=1e-6)
                if db is None:
                    assert b.delta_bias() is None
                else:
                    torch.testing.assert_close(b.delta_bias(), db, rtol=1e-5, atol=1e-6)
                block = x @ dw + (0 if db is None else db)
                expected[..., b.projection.start : b.projection.stop] += block
                checked += 1
            torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    assert checked >= 4


def test_gqa_heads_follow_the_adapted_projection():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads, head size 8
    adapted = kmix(model, "kernel_mix_qvo")
    att = adapted.anatomy.layers[0].self_attention
    q = next(b for b in branches(adapted) if b.projection is att.q)
    v = next(b for b in branches(adapted) if b.projection is att.v)
    o = next(b for b in branches(adapted) if b.projection is att.o)
    assert isinstance(q, KernelWise) and q.head_in.shape == (4, 3, 32) and q.head_out.shape == (4, 3, 8)
    assert isinstance(v, KernelWiseLite) and v.head_in.shape == (2, 8, 8) and v.kv_of_head.tolist() == [0, 1]
    assert isinstance(o, KernelWiseOut) and o.head_in.shape == (4, 8, 8) and o.head_out.shape == (32, 32)
    lite_q = branches(kmix(tiny_model("llama"), "kernel_wise_lite_qv"), KernelWiseLite)[0]
    assert lite_q.heads == 4 and lite_q.kv_of_head.tolist() == [0, 0, 1, 1]  # ⌊h·H_kv/H⌋


# ---------------------------------------------------------------- head-specificity and the lite trick


@pytest.mark.parametrize("family", ["gpt2", "roberta_cls"])
def test_kernel_wise_is_head_specific(family):
    model = tiny_model(family)
    adapted = kmix(model, "kernel_wise_mq", budget="intermediate")  # q: full, rank 12 per head
    randomise(adapted)
    q = branches(adapted, KernelWise)[0]
    H, p, r, d = q.heads, q.head_dim, q.r, q.d_in
    with torch.no_grad():
        dw = q.delta_weight()
        for h in range(H):
            B = q.head_in[h].t()  # (d, r): head h's own input basis
            block = dw[:, h * p : (h + 1) * p]
            residual = block - B @ torch.linalg.lstsq(B, block).solution
            assert residual.abs().max() < 1e-4  # column space ⊂ span(B^(h))
        assert torch.linalg.matrix_rank(dw) <= min(H * r, d)
    # With rank 2 per head the bound is below the width and tight: rank(ΔW_q) = N_h·r = 8 < d = 32,
    # and two heads' blocks span different spaces (a shared-basis LoRA would give one space).
    model2 = tiny_model(family)
    adapted2 = apply_method(model2, describe(model2),
                            method_cfg("kernel_wise_mq", "budget.kernel_wise_mq.q_wise=2", budget="intermediate"))
    randomise(adapted2)
    q2 = branches(adapted2, KernelWise)[0]
    with torch.no_grad():
        dw2 = q2.delta_weight()
        assert torch.linalg.matrix_rank(dw2) == q2.heads * 2 == 8 < d
        assert torch.linalg.matrix_rank(dw2[:, : 2 * p]) == 4


@pytest.mark.parametrize("key_bias", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "roberta_cls", "llama"])
def test_lite_trick_equals_the_explicit_key_basis(family, key_bias):
    """K^(h) B_k A (the keys the model computes anyway) = X W_k^(h) B_k A (+ b_k B_k A), to 1e-6."""
    model = tiny_model(family)
    fam = describe(model).family
    adapted = kmix(model, "kernel_wise_lite_qv", f"lite_basis_includes_key_bias={str(key_bias).lower()}",
                   "train_bias=false")
    randomise(adapted, scale=0.3)
    g = torch.Generator().manual_seed(0)
    for lite in branches(adapted, KernelWiseLite):
        att = next(a for _, a in adapted.anatomy.attentions("self") if lite.projection in (a.q, a.v))
        wk, bk = key_block(att, fam)
        x = torch.randn(2, 5, lite.d_in, generator=g)
        with torch.no_grad():
            wkh = wk.unflatten(1, (att.num_kv_heads, lite.head_dim))
            wkh = wkh[:, [h * att.num_kv_heads // lite.heads for h in range(lite.heads)]]
            bkh = None if bk is None else bk.view(att.num_kv_heads, -1)[lite.kv_of_head]
            BkA = torch.einsum("hpr,hrq->hpq", lite.head_in, lite.head_out)
            explicit = torch.einsum("bnd,dhp,hpq->bnhq", x, wkh, BkA)
            if bkh is not None and key_bias:
                explicit = explicit + torch.einsum("hp,hpq->hq", bkh, BkA)
            explicit = explicit.flatten(-2)
            if lite.uses_base_output:  # GPT-2: the keys come from c_attn's own output
                got = lite(x, getattr(lite.projection.parent, lite.projection.attr).base(x))
            else:
                got = lite(x)  # Linear, eval: the (d, H·r) basis W_k·blockdiag(B_k)
                lite.train()
                lite.dropout = torch.nn.Dropout(1e-12)  # the training path: K = X W_k (+ b_k), dropped
                got_train = lite(x)
                lite.eval()
                torch.testing.assert_close(got_train, explicit, rtol=0, atol=1e-6)
        torch.testing.assert_close(got, explicit, rtol=0, atol=1e-6)
    assert all(b.uses_base_output == (family == "gpt2") for b in branches(adapted, KernelWiseLite))


def test_gpt2_lite_branch_reads_the_keys_of_c_attn_and_trains():
    """The fused path: the branch reads K from c_attn's output; gradients reach the factors and
    the layer input (the in-place update of the shared output does not break autograd)."""
    model = tiny_model("gpt2")
    adapted = kmix(model, "kernel_mix_lite_qv", budget="small")
    randomise(adapted)
    model.train()
    seen = []
    lite = branches(adapted, KernelWiseLite)[0]
    handle = lite.register_forward_hook(lambda m, args, out: seen.append(len(args)))
    batch = inputs("gpt2")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    handle.remove()
    assert seen == [2]  # called as branch(x, y)
    for b in adapted.all_components():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())


# ---------------------------------------------------------------- KV cache


@torch.no_grad()
def test_t5_decoder_cache_with_cross_attention_lite_v():
    model = tiny_model("t5")
    adapted = kmix(model, "kernel_mix_qvo", "attention=all")
    randomise(adapted)
    batch = inputs("t5")
    enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    dec = batch["decoder_input_ids"]
    full = model(encoder_outputs=enc, attention_mask=batch["attention_mask"], decoder_input_ids=dec).logits
    out = model(encoder_outputs=enc, attention_mask=batch["attention_mask"], decoder_input_ids=dec[:, :1],
                use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(1, dec.shape[1]):
        out = model(encoder_outputs=enc, attention_mask=batch["attention_mask"], decoder_input_ids=dec[:, t : t + 1],
                    past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- init, scaling, dropout, fidelity


def test_kaiming_zero_init_is_per_head():
    adapted = kmix(tiny_model("gpt2"), "kernel_mix_qvo", budget="intermediate")
    for b in branches(adapted):
        # fan-in of one head's input-side factor: d for full q/v (B^(h) ∈ R^{d×r}), p for lite
        # (B_k^(h) ∈ R^{p×r}) and for W_o (Ã^(h) ∈ R^{p×r}) — not torch's fan-in of the 3-D tensor.
        fan_in = b.d_in if isinstance(b, KernelWise) else b.head_dim
        bound = 1 / math.sqrt(fan_in)
        assert b.head_in.abs().max() <= bound and b.head_in.abs().max() > 0.8 * bound
        assert torch.count_nonzero(b.head_out) == 0 and torch.count_nonzero(b.head_bias) == 0
        assert b.scaling == 1.0
    for b in branches(adapted, LoRA):  # the shared part: LoRA's init, no bias, s = 1
        assert b.lora_bias is None and b.scaling == 1.0 and torch.count_nonzero(b.lora_B) == 0
        assert b.lora_A.abs().max() <= 1 / math.sqrt(b.d_in)


@pytest.mark.parametrize("how", [("init=houlsby",), ()])
def test_houlsby_init_for_every_factor_and_bias(how):
    fidelity = "paper" if how else "code"
    adapted = kmix(tiny_model("gpt2"), "kernel_mix_qvo", *how, budget="intermediate", fidelity=fidelity)
    values = torch.cat([p.detach().flatten() for c in adapted.all_components() for p in c.parameters()])
    assert values.numel() > 1000 and torch.count_nonzero(values) == values.numel()
    assert values.abs().max() < 0.02 and 0.006 < values.std() < 0.011  # fmod(N(0,1), 2) · 0.01
    assert all(b.head_bias is not None for b in branches(adapted))


def test_fidelity_code_ties_o_to_v_and_uses_the_key_bias():
    cfg = ("lite_basis_includes_key_bias=false", "o.wise=1", "o.shared=1")
    paper = kmix(tiny_model("gpt2"), "kernel_mix_qvo", *cfg)
    code = kmix(tiny_model("gpt2"), "kernel_mix_qvo", *cfg, fidelity="code")
    o_paper = [b.r for b in paper.all_components() if b.projection.attr == "c_proj"]
    o_code = [b.r for b in code.all_components() if b.projection.attr == "c_proj"]
    assert len(o_paper) == len(o_code) == 2 * 2  # head-specific + shared, 2 layers
    assert set(o_paper) == {1} and set(o_code) == {8}  # V ranks: wise 8 (lite), shared 8
    assert not any(b.key_bias for b in branches(paper, KernelWiseLite))
    assert all(b.key_bias for b in branches(code, KernelWiseLite))
    assert all(b.scaling == 1.0 for b in code.all_components())
    tied = kmix(tiny_model("gpt2"), "kernel_mix_qvo", "o.wise=1", "tie_o_to_v=true")
    assert {b.r for b in branches(tied, KernelWiseOut)} == {8}
    # qv variants have no O part, tied or not.
    assert not branches(kmix(tiny_model("gpt2"), "kernel_mix_lite_qv", fidelity="code"), KernelWiseOut)


def test_scale_multiplies_every_branch():
    model = tiny_model("roberta_cls")
    batch = inputs("roberta_cls")
    twin = copy.deepcopy(model)
    one = kmix(model, "kernel_mix_qvo")
    two = kmix(twin, "kernel_mix_qvo", "scale=2.0")
    randomise(one)
    randomise(two)
    assert {b.scaling for b in two.all_components()} == {2.0}
    for comps in (one, two):
        for b in comps.all_components():
            assert b.delta_weight().abs().max() > 0
    d1 = sum((b.delta_weight() for b in branches(one, KernelWise)), torch.zeros(()))
    d2 = sum((b.delta_weight() for b in branches(two, KernelWise)), torch.zeros(()))
    torch.testing.assert_close(d2, 2 * d1)
    out1, out2, base = output(model, batch), output(twin, batch), output(tiny_model("roberta_cls"), batch)
    assert (out1 - base).abs().max() > 1e-4 and not torch.allclose(out1, out2)


def test_dropout_masks_are_independent_per_branch_and_training_only():
    nodrop = ("+model.architecture.resid_pdrop=0", "+model.architecture.embd_pdrop=0",
              "+model.architecture.attn_pdrop=0")
    cfg = config("model=tiny_gpt2", *nodrop)
    model = load_model(cfg.model, "causal_lm", seed=0)
    adapted = kmix(model, "kernel_mix_qvo", dropout=0.5)
    randomise(adapted)
    drops = [b.dropout for b in adapted.all_components()]
    assert all(isinstance(d, torch.nn.Dropout) and d.p == 0.5 for d in drops)
    assert len({id(d) for d in drops}) == len(drops)  # one module (one mask) per branch
    batch = inputs("gpt2")
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)
    model.eval()
    assert torch.equal(output(model, batch), output(model, batch))
    # The fused lite branch works on K from c_attn's output, not on X: with K = 0 only β is left.
    lite = branches(adapted, KernelWiseLite)[0]
    x = torch.randn(2, 4, 32)
    y = torch.zeros(2, 4, 96)
    lite.train()
    with torch.no_grad():
        assert torch.count_nonzero(lite(x, y) - lite.head_bias) == 0


# ---------------------------------------------------------------- structure, errors


def test_no_python_loop_in_any_forward():
    """[KM] App. B.3: the forwards and deltas are batched over heads (static check)."""
    for cls in (KernelWise, KernelWiseLite, KernelWiseOut, HeadwiseBranch):
        for name in ("forward", "delta_weight", "delta_bias", "_per_head", "_bk_a", "_finish"):
            fn = cls.__dict__.get(name)
            if fn is None:
                continue
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(fn)))
            loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.comprehension))]
            assert not loops, f"{cls.__name__}.{name} loops"


def test_only_the_components_train_and_names_are_clear():
    model = tiny_model("gpt2")
    adapted = kmix(model, "kernel_mix_qvo")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.split(".")[-1] in ("head_in", "head_out", "head_bias", "lora_A", "lora_B") for n in names)
    assert adapted.count().trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("method", "override", "match"),
    [
        ("kernel_wise_mq", "q.shared=2", "Kernel-wise has no shared part"),
        ("kernel_mix_qvo", "o.basis=lite", "for q and v only"),
        ("kernel_mix_qvo", "q.basis=lora", "must be full or lite"),
        ("kernel_mix_lite_qv", "q.wise=-1", "must be >= 0"),
        ("kernel_mix_lite_qv", "init=normal", "unknown init"),
        ("kernel_mix_lite_qv", "k.wise=1", "the lite basis is the frozen W_k"),
    ],
)
def test_bad_settings_are_one_line_errors(method, override, match):
    with pytest.raises(KpeftError, match=match) as info:
        kmix(tiny_model("llama"), method, override)
    assert "\n" not in str(info.value)


def test_a_typo_in_the_matrix_spec_names_the_key():
    with pytest.raises(KpeftError, match=r"method\.components\.kernel_mix\.q\.wize"):
        compose(["method=kernel_mix_qvo", "budget=intermediate", "method.components.kernel_mix.q.wize=1"])


@pytest.mark.parametrize("method", list(METHODS))
def test_budgets_that_cannot_size_a_method_say_which_can(method):
    for budget in ("tiny", "small", "intermediate", "nlu", "t5_glue"):
        section = compose(["method=lora", f"budget={budget}"]).budget[method]
        if section is None:
            with pytest.raises(KpeftError, match=f"method '{method}' cannot meet budget '{budget}': it gives no "
                                                 f"{method} size; budgets that do: "):
                compose([f"method={method}", f"budget={budget}"])
        else:
            resolved = OmegaConf.to_container(compose([f"method={method}", f"budget={budget}"]).method, resolve=True)
            spec = resolved["components"][component(method)]
            assert spec["q"]["wise"] == section.q_wise and spec["v"]["shared"] == section.v_lora


# ---------------------------------------------------------------- the papers' counts ([KM] Table B.5; [KM] Table 1, [IT] Table 1)


@pytest.mark.parametrize(
    ("args", "total", "trainable", "line"),
    [
        (["model=gpt2", "method=kernel_mix_lite_qv", "budget=tiny"], 124_439_808, 92_160, "(0.07%)"),
        (["model=gpt2", "method=kernel_mix_lite_qv", "budget=small"], 124_439_808, 147_456, "(0.12%)"),
        (["model=gpt2", "method=kernel_mix_lite_qv", "budget=small", "budget.kernel_mix_lite_qv.v_wise=2"],
         124_439_808, 165_888, "(0.13%)"),
        (["model=gpt2", "method=kernel_wise_lite_qv", "budget=small"], 124_439_808, 165_888, "(0.13%)"),
        (["model=gpt2", "method=kernel_wise_mq", "budget=intermediate"], 124_439_808, 1_935_360, "(1.56%)"),
        (["model=gpt2", "method=kernel_wise_mv", "budget=intermediate"], 124_439_808, 1_935_360, "(1.56%)"),
        (["model=gpt2", "method=kernel_wise_qvo", "budget=intermediate"], 124_439_808, 2_009_088, "(1.61%)"),
        (["model=gpt2", "method=kernel_mix_qvo", "budget=intermediate"], 124_439_808, 2_009_088, "(1.61%)"),
        (["model=roberta_base", "method=kernel_mix_qvo", "budget=nlu"], 124_645_632, 608_256, "(0.49%)"),
    ],
)
def test_count_reproduces_table_b5(args, total, trainable, line, capsys):
    record = count_main(args)
    assert (record["total"], record["trainable"], record["stored"]) == (total, trainable, trainable)
    assert f"trainable {trainable:,} {line}" in capsys.readouterr().out.splitlines()


def test_count_per_layer_breakdown_of_kernel_mix_qvo():
    # [KM] Table B.5: Q 49,152, V 25,344, O 92,928 per GPT-2 layer.
    cfg = compose(["model=gpt2", "method=kernel_mix_qvo", "budget=intermediate"])
    model = load_model(cfg.model, "causal_lm", meta=True)
    adapted = apply_method(model, describe(model), cfg.method)
    att = adapted.anatomy.layers[0].self_attention
    per = {name: sum(p.numel() for c in adapted.all_components() if c.projection is getattr(att, name)
                     for p in c.parameters()) for name in ("q", "v", "o")}
    assert per == {"q": 49_152, "v": 25_344, "o": 92_928}


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("method", list(METHODS))
def test_a_short_training_run_completes(method, tmp_path):
    from kpeft.train import run

    cfg = compose(["model=tiny_gpt2", "task=demo_reverse", f"method={method}", f"budget={METHODS[method]}",
                   "train.epochs=1", f"output_root={tmp_path}", "train.progress=false"])
    record = run(cfg)
    assert record["status"] == "complete"
    assert record["params"]["trainable"] > 0 and math.isfinite(record["metrics"]["test"]["loss"])


def test_module_registers_both_kinds():
    from kpeft.methods import BUILDERS

    assert BUILDERS["kernel_mix"] is BUILDERS["kernel_wise"] is kernelwise.build_kernel_mix
    assert set(FAMILIES) >= {"gpt2", "roberta_cls", "t5", "llama"}


@pytest.mark.parametrize("family", ["roberta_cls", "t5", "llama"])
def test_linear_backbones_train_with_dropout(family):
    """Training mode on nn.Linear backbones takes the explicit-K path (dropout acts on K), GQA too."""
    model = tiny_model(family)
    adapted = kmix(model, "kernel_mix_qvo", dropout=0.1)
    randomise(adapted)
    model.train()
    batch = inputs(family)
    labels = torch.tensor([0, 2]) if family == "roberta_cls" else (
        batch["decoder_input_ids"] if family == "t5" else batch["input_ids"])
    model(**batch, labels=labels).loss.backward()
    for b in adapted.all_components():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in b.parameters())


def test_kernel_wise_on_k_has_kv_heads_and_merges():
    model = tiny_model("llama")
    batch = inputs("llama")
    adapted = kmix(model, "kernel_wise_mq", "k.wise=2")
    att = adapted.anatomy.layers[1].self_attention
    k = next(b for b in branches(adapted) if b.projection is att.k)
    assert isinstance(k, KernelWise) and k.head_in.shape == (2, 2, 32) and k.head_out.shape == (2, 2, 8)
    randomise(adapted)
    unmerged = output(model, batch)
    adapted.merge()
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)
