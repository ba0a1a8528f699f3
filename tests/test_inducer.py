"""Inducer-tuning ([IT] §4): λ by LSE, the residual form against an explicit per-query
concatenated-prefix attention (Eq. 7 vs Eq. 8, naive loops in the test), Gating ≠ the frozen model at a
zero value, the cache rows, no causal leakage, counts, the fidelity switches, and short trainings of
every variant. The generic checks (zero value = the frozen model, KV cache = full recompute, padding,
save/load, gradients) run in tests/test_matrix.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    check_future_tokens_do_not_leak,
    inputs,
    method_cfg,
    output,
    randomise,
    tiny_model,
)

from kpeft.backbones import describe
from kpeft.count import main as count_main
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.attention_site import SITE_ATTR, AttentionCall
from kpeft.methods.base import AdaptedProjection
from kpeft.methods.inducer import Inducer, InducerValueBranch, inducer_lambda, inducer_params_per_layer
from kpeft.train import run

VARIANTS = ["inducer", "inducer_gating", "inducer_adaptive", "inducer_extension", "inducer_lora"]
FOUR = ["gpt2", "roberta_base", "t5", "llama"]  # outputs: logits, or RoBERTa's last hidden states


def adapt(family: str, method: str = "inducer", *overrides: str, budget: str = "intermediate",
          fidelity: str = "paper", seed: int = 0, scale: float | None = 0.2) -> AdaptedModel:
    """`method` on a tiny `family` model; with `scale`, random non-zero component tensors."""
    model = tiny_model(family, seed=seed)
    extra = ("method.components.lora.dropout=0",) if method == "inducer_lora" else ()
    adapted = apply_method(model, describe(model), method_cfg(method, *extra, *overrides, budget=budget), fidelity)
    if scale is not None:
        randomise(adapted, scale=scale)
    return adapted


def inducers(adapted: AdaptedModel) -> list[Inducer]:
    return [c for c in adapted.all_components() if isinstance(c, Inducer)]


# ---------------------------------------------------------------- λ


def test_lambda_by_lse_is_the_first_column_of_the_concatenated_softmax():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, generator=g) * 4
    scores = torch.randn(2, 3, 5, 9, generator=g) * 4
    scores[0, :, :, 6:] = torch.finfo(torch.float32).min  # masked keys (padding)
    scores[1] = scores[1] + torch.triu(torch.full((5, 9), torch.finfo(torch.float32).min), 5)  # causal
    expected = torch.softmax(torch.cat([a[..., None], scores], -1), -1)[..., 0]
    torch.testing.assert_close(inducer_lambda(a, scores), expected, rtol=1e-6, atol=1e-7)
    # large logits: still exact, no overflow
    torch.testing.assert_close(inducer_lambda(a * 100, scores), torch.softmax(
        torch.cat([a[..., None] * 100, scores], -1), -1)[..., 0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- Eq. 7 vs Eq. 8, naively


def spy_on_sites(adapted: AdaptedModel) -> tuple[list, list, list]:
    """Record, per self-attention module: the attention function's inputs, the module's input
    hidden states, and the module's output (after W_o)."""
    calls, hidden, outs = [], [], []
    for _, att in adapted.anatomy.attentions("self"):
        site = getattr(att.module, SITE_ATTR)
        original = site.attend

        def spy(module, q, k, v, mask, scaling, dropout, _o=original, **kw):
            calls.append({"att": module, "q": q, "k": k, "v": v, "mask": mask, "scaling": scaling,
                          "bias": kw.get("position_bias")})
            return _o(module, q, k, v, mask, scaling, dropout, **kw)

        site.attend = spy

        def pre(module, args, kwargs):
            hidden.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        att.module.register_forward_pre_hook(pre, with_kwargs=True)
        att.module.register_forward_hook(lambda m, i, o: outs.append(o[0]))
    return calls, hidden, outs


def naive_module_output(att, inducer: Inducer, call: dict, x: torch.Tensor) -> torch.Tensor:
    """The attention sub-layer output by explicit per-(batch, head, query) concatenated-prefix
    attention: query i prepends its own inducer key P_k,i and value P_v,i (Eq. 7), in float64."""
    d64 = torch.float64
    q, k, v = call["q"].to(d64), call["k"].to(d64), call["v"].to(d64)
    B, H, n, p = q.shape
    group = H // k.shape[1]
    wrapper = getattr(att.q.parent, att.q.attr)
    if att.rotary:  # the inducer reads the pre-RoPE query: the q projection's output (+ LoRA)
        q_lin = wrapper.base(x) + sum(b(x) for b in wrapper.branches) if isinstance(wrapper, AdaptedProjection) \
            else wrapper(x)
        q_pre = q_lin.to(d64).view(B, n, H, p).transpose(1, 2)
    else:
        q_pre = q
    W_o = att.o.weight().to(d64)  # row convention (H·p, d)
    b_o = att.o.bias()
    P = {name: t.detach().to(d64) for name, t in inducer.named_parameters()}
    mask, bias, scaling = call["mask"], call["bias"], call["scaling"]
    out = torch.zeros(B, n, W_o.shape[1], dtype=d64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group], v[b, h // group]
            Wo_h = W_o[h * p:(h + 1) * p]
            for i in range(n):
                qi, qpi = q[b, h, i], q_pre[b, h, i]
                if inducer.k_w1 is not None:
                    pk = qpi + torch.tanh(qpi @ P["k_w1"][h] + P["k_b1"][h, 0]) @ P["k_w2"][h] + P["k_b2"][h, 0]
                else:
                    pk = qpi
                a = (qpi @ pk) * scaling
                s = (kh @ qi) * scaling
                if bias is not None:
                    s = s + bias[0 if bias.shape[0] == 1 else b, h, i].to(d64)
                if mask is not None:
                    s = s + mask[b, 0, i].to(d64)
                probs = torch.softmax(torch.cat([a[None], s]), 0)  # [λ, (1−λ)·softmax(S)]
                attn = torch.softmax(s, 0)
                hidden = torch.tanh(qpi @ P["v_w1"][h] + P["v_b1"][h, 0])
                if inducer.value == "extended":  # per-head complete outputs in model width (Eq. 9)
                    rows = vh @ Wo_h  # V_j W_o^(h)
                    mlp = hidden @ P["v_w2"][h]  # MLP̄_v^(h) without the shared b2
                    p_v = mlp if inducer.gating else attn @ rows + mlp
                    out[b, i] += probs @ torch.cat([p_v[None], rows])
                else:  # head-local value, then W_o
                    mlp = hidden @ P["v_w2"][h] + P["v_b2"][h, 0]
                    p_v = mlp if inducer.gating else attn @ vh + mlp
                    out[b, i] += (probs @ torch.cat([p_v[None], vh])) @ Wo_h
    if b_o is not None:
        out += b_o.to(d64)
    if inducer.value == "extended":
        out += P["v_b2"]  # the shared b2, once, unweighted
    return out


@pytest.mark.parametrize(("family", "method"), [
    ("gpt2", "inducer"), ("gpt2", "inducer_gating"), ("gpt2", "inducer_adaptive"), ("gpt2", "inducer_extension"),
    ("llama", "inducer_lora"), ("t5", "inducer"),
])
def test_the_residual_form_equals_explicit_per_query_concatenated_attention(family, method):
    adapted = adapt(family, method)
    calls, hidden, outs = spy_on_sites(adapted)
    output(adapted.model, inputs(family))
    atts = [att for _, att in adapted.anatomy.attentions("self")]
    comps = inducers(adapted)
    assert len(calls) == len(atts) == len(comps) == len(outs) == len(hidden)
    for index, (att, inducer, call, x, got) in enumerate(zip(atts, comps, calls, hidden, outs)):
        assert call["att"] is att.module
        if family == "t5" and index % 2:  # T5: the first encoder and the first decoder layer suffice
            continue
        if family == "t5":
            assert call["scaling"] == 1.0 and call["bias"] is not None  # no 1/√p; relative bias in S
        with torch.no_grad():
            expected = naive_module_output(att, inducer, call, x)
        torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------- zero value / gating


@pytest.mark.parametrize("family", FOUR)
def test_a_zero_value_mlp_does_not_give_the_frozen_model_with_gating(family):
    """(1−λ)·f̄ ≠ f̄. The residual form with MLP_v ≡ 0 is the frozen model: tests/test_matrix.py
    (inducer and inducer_adaptive with init=zero_value on these four families)."""
    batch = inputs(family)
    model = tiny_model(family)
    model.set_attn_implementation("eager")  # the frozen model's own (eager) attention
    frozen = output(model, batch)
    adapted = apply_method(model, describe(model), method_cfg("inducer_gating", "method.components.inducer.init=zero_value",
                                                              budget="intermediate"))
    comps = inducers(adapted)
    assert comps and all(torch.count_nonzero(c.v_w2) == 0 and torch.count_nonzero(c.v_b2) == 0 for c in comps)
    assert (output(model, batch) - frozen).abs().max() > 1e-4


def test_houlsby_init_is_small_everywhere_and_starts_near_the_frozen_model():
    adapted = adapt("gpt2", scale=None)
    values = torch.cat([p.detach().flatten() for c in inducers(adapted) for p in c.parameters()])
    assert torch.count_nonzero(values) == values.numel() and values.abs().max() < 0.02
    assert 0.006 < values.std() < 0.011


# ---------------------------------------------------------------- cache, causality, padding


def _ids(batch=2, seq=9, seed=4):
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_kv_cache_holds_only_the_real_tokens(family):
    # (cached decoding = a full recompute, and left-padded generation: tests/test_matrix.py)
    model = adapt(family, "inducer_lora").model
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids[:, :4], use_cache=True)
        for t in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]  # no extra cache rows


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_changing_future_tokens_leaves_earlier_outputs_unchanged(family):
    check_future_tokens_do_not_leak(adapt(family, "inducer").model, family)


# ---------------------------------------------------------------- training-time behaviour


def _call(heads=4, p=8, n=3, N=5, dropout=0.0, training=False) -> AttentionCall:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads, n, p, generator=g)
    module = torch.nn.Identity().train(training)
    call = AttentionCall(module=module, query=q, key=torch.randn(2, heads, N, p, generator=g), value=None,
                         mask=None, scaling=p ** -0.5, dropout=dropout, causal=False, query_pre=q, n_keys=N)
    call.scores = call.logits = torch.randn(2, heads, n, N, generator=g)
    return call


def test_lambda_gets_the_attention_dropout_in_training_only():
    torch.manual_seed(0)
    inducer = Inducer(4, 8, 32, r_k=3, r_v=5)
    f = torch.randn(2, 4, 3, 8)
    results = []
    for training in (True, True, False):
        inducer.transform_output(_call(dropout=0.5, training=training), f)
        results.append(inducer.take_value_output())
    inducer.transform_output(_call(), f)
    plain = inducer.take_value_output()
    assert not torch.equal(results[0], results[1])  # independent dropout masks on λ
    assert torch.equal(results[2], plain)  # eval: no dropout
    inducer.lambda_dropout = False
    inducer.transform_output(_call(dropout=0.5, training=True), f)
    assert torch.equal(inducer.take_value_output(), plain)
    with pytest.raises(RuntimeError, match="without an attention call"):
        inducer.take_value_output()  # taken once


# (gradients reach exactly the trainable tensors, inducer_lora on GPT-2 and Llama: tests/test_matrix.py)


def test_the_fidelity_switches():
    paper = inducers(adapt("roberta_cls", "inducer", budget="nlu", scale=None))
    code = inducers(adapt("roberta_cls", "inducer", budget="nlu", fidelity="code", scale=None))
    assert all(c.mask_padding_in_lambda and not c.position_scaled_logit for c in paper)
    assert all(not c.mask_padding_in_lambda for c in code)  # the NLU code's λ ignores padding
    gpt2_code = inducers(adapt("gpt2", "inducer_adaptive", fidelity="code", scale=None))
    assert all(c.mask_padding_in_lambda and c.position_scaled_logit for c in gpt2_code)  # r_k = 0: a·√i
    # λ before the padding mask: padded keys enter λ's normaliser, so padding changes outputs.
    batch = inputs("roberta_cls")
    for fidelity, invariant in (("paper", True), ("code", False)):
        model = adapt("roberta_base", "inducer", budget="nlu", fidelity=fidelity).model
        padded = {"input_ids": torch.cat([batch["input_ids"], torch.ones(2, 2, dtype=torch.long)], 1),
                  "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(2, 2, dtype=torch.long)], 1)}
        a, b = output(model, batch)[1], output(model, padded)[1, :7]
        assert torch.allclose(a, b, atol=1e-5) == invariant


def test_the_inducer_is_not_mergeable_and_merge_changes_nothing():
    adapted = adapt("gpt2", "inducer_lora")
    model = adapted.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not adapted.mergeable
    with pytest.raises(ValueError, match="cannot be merged"):
        adapted.merge()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    branches = [b for m in model.modules() if isinstance(m, AdaptedProjection) for b in m.branches
                if isinstance(b, InducerValueBranch)]
    assert len(branches) == 2 and all(sum(p.numel() for p in b.parameters()) == 0 for b in branches)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_state_round_trips_and_a_deep_copy_is_independent(family):
    adapted = adapt(family, "inducer_lora")
    batch = inputs(family)
    state = adapted.adapter_state_dict()
    assert all(SITE_ATTR in n or "lora_" in n for n in state)
    expected = output(adapted.model, batch)
    twin = copy.deepcopy(adapted.model)
    torch.testing.assert_close(output(twin, batch), expected, rtol=0, atol=0)
    randomise(adapted, seed=9)
    assert not torch.equal(output(adapted.model, batch), expected)
    torch.testing.assert_close(output(twin, batch), expected, rtol=0, atol=0)  # the copy has its own hooks
    adapted.load_adapter_state_dict(state)
    assert torch.equal(output(adapted.model, batch), expected)


# ---------------------------------------------------------------- counts ([IT] Table 5; [KM] Table 1, [IT] Table 1)


@pytest.mark.parametrize(("args", "total", "trainable", "line"), [
    (["model=gpt2", "method=inducer", "budget=intermediate"], 124_439_808, 2_003_472, "trainable 2,003,472 (1.61%)"),
    (["model=gpt2", "method=inducer_gating", "budget=intermediate"], 124_439_808, 2_003_472,
     "trainable 2,003,472 (1.61%)"),
    (["model=gpt2", "method=inducer_lora", "budget=intermediate"], 124_439_808, 2_002_320,
     "trainable 2,002,320 (1.61%)"),
    (["model=gpt2", "method=inducer_adaptive", "budget=intermediate"], 124_439_808, 2_015_424,
     "trainable 2,015,424 (1.62%)"),
    (["model=gpt2", "method=inducer_extension", "budget=intermediate"], 124_439_808, 1_928_448,
     "trainable 1,928,448 (1.55%)"),
    (["model=roberta_base", "method=inducer", "budget=nlu"], 124_645_632, 609_696, "trainable 609,696 (0.49%)"),
    (["model=roberta_base", "method=inducer_lora", "budget=nlu"], 124_645_632, 609_120, "trainable 609,120 (0.49%)"),
])
def test_count_reproduces_table_5(args, total, trainable, line, capsys):
    record = count_main(args)
    assert (record["total"], record["trainable"], record["stored"]) == (total, trainable, trainable)
    assert line in capsys.readouterr().out.splitlines()


def test_the_per_layer_formulas():
    # [IT] Table 5: MLP_k(r) = 1548r + 768 (r ≥ 2), MLP̄_v(r) = 9996r + 768, MLP_v(r) = 1548r + 768.
    assert inducer_params_per_layer(12, 64, 768, 10, 15) == 1548 * 10 + 768 + 9996 * 15 + 768
    assert inducer_params_per_layer(12, 64, 768, 1, 16) == 9996 * 16 + 768  # r_k < 2: no MLP_k
    assert inducer_params_per_layer(12, 64, 768, 0, 108, "local") == 1548 * 108 + 768
    for method, (r_k, r_v, value) in {"inducer": (10, 15, "extended"), "inducer_adaptive": (0, 108, "local")}.items():
        adapted = adapt("gpt2", method, scale=None)
        per = [sum(p.numel() for p in c.parameters()) for c in inducers(adapted)]
        assert per == [inducer_params_per_layer(4, 8, 32, r_k, r_v, value)] * 2


# ---------------------------------------------------------------- short trainings


@pytest.mark.parametrize("method", VARIANTS)
def test_a_short_training_run_completes(method, tmp_path):
    from kpeft.compose import compose

    cfg = compose(["model=tiny_gpt2", "task=demo_reverse", f"method={method}", "budget=intermediate",
                   "train.epochs=1", f"output_root={tmp_path}", "train.progress=false",
                   "task.options.n_train=128", "task.options.n_val=32", "task.options.n_test=32"])
    record = run(cfg)
    assert record["status"] == "complete" and record["training"]["steps"] == 4
    assert record["params"]["trainable"] > 0 and record["params"]["trainable"] == record["params"]["stored"]
