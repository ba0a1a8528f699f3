"""Prefix-tuning (Li & Liang 2021): equal to the official formulation (the prefix as the first l cache
rows, real positions from l) and to a naive per-head concatenated attention; the cache rows,
causality; trained vs stored counts; the evaluation-time prefix table. The generic checks (KV cache =
full recompute, batched generation, padding, save/load, gradients): tests/test_matrix.py."""

from __future__ import annotations

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
from transformers import DynamicCache

from kpeft.backbones import describe
from kpeft.count import main as count_main
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.attention_site import SITE_ATTR
from kpeft.methods.prefix import PrefixTuning
from kpeft.train import run


def adapt(family: str, *overrides: str, budget: str = "small", seed: int = 0, scale: float | None = None) -> AdaptedModel:
    model = tiny_model(family, seed=seed)
    adapted = apply_method(model, describe(model), method_cfg("prefix", *overrides, budget=budget))
    if scale is not None:
        randomise(adapted, scale=scale)
    return adapted


def prefix_of(adapted: AdaptedModel) -> PrefixTuning:
    (prefix,) = adapted.components["prefix"]
    return prefix


def _ids(batch=2, seq=9, seed=4):
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the official formulation


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("offset", [True, False])
def test_prefix_equals_a_cache_whose_first_rows_are_the_prefix(family, offset):
    adapted = adapt(family, f"method.components.prefix.position_offset={str(offset).lower()}")
    prefix = prefix_of(adapted)
    length = prefix.length
    ids = _ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    with torch.no_grad():
        ours = adapted.model(input_ids=ids, attention_mask=mask).logits
        twin = tiny_model(family)  # the same frozen weights, no method, eager attention
        twin.set_attn_implementation("eager")
        cache = DynamicCache(config=twin.config)
        for i in range(prefix.n_layers):
            k, v = prefix.layer_kv(i)
            cache.update(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), i)
        positions = torch.arange(7)[None] + (length if offset else 0)
        theirs = twin(input_ids=ids, attention_mask=torch.cat([torch.ones(2, length, dtype=torch.long), mask], 1),
                      past_key_values=cache, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - output(twin, {"input_ids": ids, "attention_mask": mask})).abs().max() > 1e-3  # it does act


def spy_on_sites(adapted: AdaptedModel) -> tuple[list, list]:
    """Per self-attention module: the attention function's inputs (before the prefix is
    prepended) and what the module returned."""
    calls, outs = [], []
    for _, att in adapted.anatomy.attentions("self"):
        site = getattr(att.module, SITE_ATTR)
        original = site.attend

        def spy(module, q, k, v, mask, scaling, dropout, _o=original, **kw):
            calls.append({"q": q, "k": k, "v": v, "mask": mask, "scaling": scaling, "bias": kw.get("position_bias")})
            return _o(module, q, k, v, mask, scaling, dropout, **kw)

        site.attend = spy
        att.module.register_forward_hook(lambda m, i, o: outs.append(o[0]))
    return calls, outs


@pytest.mark.parametrize("family", ["roberta_base", "t5"])
def test_prefix_equals_naive_per_head_attention_over_concatenated_keys_and_values(family):
    adapted = adapt(family)
    prefix = prefix_of(adapted)
    calls, outs = spy_on_sites(adapted)
    output(adapted.model, inputs(family))
    atts = [att for _, att in adapted.anatomy.attentions("self")]
    assert len(calls) == len(outs) == len(atts) == prefix.n_layers
    for index, (att, call, got) in enumerate(zip(atts, calls, outs)):
        pk, pv = (t.detach() for t in prefix.layer_kv(index))
        q, k, v, mask, bias = call["q"], call["k"], call["v"], call["mask"], call["bias"]
        B, H, n, p = q.shape
        heads = torch.zeros(B, n, H, p)
        for b in range(B):
            for h in range(H):
                keys, values = torch.cat([pk[h], k[b, h]]), torch.cat([pv[h], v[b, h]])
                for i in range(n):
                    s = keys @ q[b, h, i] * call["scaling"]
                    extra = torch.zeros_like(s)  # prefix columns: no mask, no position bias
                    if bias is not None:
                        extra[prefix.length:] += bias[0 if bias.shape[0] == 1 else b, h, i]
                    if mask is not None:
                        extra[prefix.length:] += mask[b, 0, i]
                    heads[b, i, h] = torch.softmax(s + extra, 0) @ values
        expected = heads.reshape(B, n, H * p)
        if family == "t5":  # T5's attention module applies W_o itself
            expected = expected @ att.o.weight()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "roberta_base", "t5"])
def test_the_fused_attention_equals_the_explicit_softmax_with_its_gradients(family, monkeypatch):
    """A prefix-only site runs scaled_dot_product_attention; the explicit softmax path (what an
    inducer site runs) gives the same outputs and gradients (padding, GQA, T5's bias included)."""
    from kpeft.methods.attention_site import AttentionSite
    from kpeft.methods.prefix import PrefixLayer

    batch, fused_calls = inputs(family), []
    plain_fused = AttentionSite._fused
    monkeypatch.setattr(AttentionSite, "_fused", staticmethod(lambda *a: fused_calls.append(1) or plain_fused(*a)))

    def run_once() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adapted = adapt(family)
        out = adapted.model(**batch)
        main = out.logits if hasattr(out, "logits") else out.last_hidden_state
        main.pow(2).mean().backward()
        return main.detach(), {n: p.grad for n, p in adapted.trainable_parameters()}

    fused, fused_grads = run_once()
    n_fused = len(fused_calls)
    monkeypatch.setattr(PrefixLayer, "needs_scores", True)
    explicit, explicit_grads = run_once()
    assert n_fused == adapt(family).components["prefix"][0].n_layers and len(fused_calls) == n_fused
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == explicit_grads.keys()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, explicit_grads[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- cache, generation, causality, padding


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_prefix_is_not_in_the_kv_cache(family):
    # (cached decoding = a full recompute, and left-padded generation: tests/test_matrix.py)
    model = adapt(family).model
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids[:, :4], use_cache=True)
        for t in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_changing_future_tokens_leaves_earlier_outputs_unchanged(family):
    check_future_tokens_do_not_leak(adapt(family).model, family)


# ---------------------------------------------------------------- the prefix table, training


def test_the_evaluation_table_follows_parameter_changes_and_equals_the_training_path():
    adapted = adapt("gpt2")
    model, prefix = adapted.model, prefix_of(adapted)
    batch = inputs("gpt2")
    with torch.enable_grad():
        trained_path = model(**batch).logits.detach()  # per-layer slices of the MLP
    evaluated = output(model, batch)  # the table, computed once
    torch.testing.assert_close(evaluated, trained_path, rtol=1e-5, atol=1e-6)
    table = prefix.prefix_table()
    assert table.shape == (8, 2 * 2 * 32)
    assert torch.equal(torch.stack(prefix.layer_kv(1)).permute(2, 0, 1, 3).reshape(8, 64), table[:, 64:].detach())
    with torch.no_grad():
        prefix.down.bias.add_(0.5)  # an in-place change (as an optimizer step): the table is recomputed
    changed = output(model, batch)
    assert (changed - evaluated).abs().max() > 1e-3
    with torch.enable_grad():
        torch.testing.assert_close(changed, model(**batch).logits.detach(), rtol=1e-5, atol=1e-6)


def test_only_the_reparameterisation_trains():
    adapted = adapt("gpt2")
    names = {n for n, _ in adapted.trainable_parameters()}
    assert names == {"kpeft_prefix.embedding.weight", "kpeft_prefix.up.weight", "kpeft_prefix.up.bias",
                     "kpeft_prefix.down.weight", "kpeft_prefix.down.bias"}
    # (the gradients reach exactly these, and prefix-tuning does not merge: tests/test_matrix.py)


@pytest.mark.parametrize(("args", "trainable", "stored", "lines"), [
    (["model=gpt2", "method=prefix", "budget=small"], 9_855_488, 147_456,
     ["trainable 9,855,488 (7.92%)", "stored 147,456 (0.12%)"]),
    (["model=gpt2", "method=prefix", "budget=intermediate"], 9_932_288, 1_990_656,
     ["trainable 9,932,288 (7.98%)", "stored 1,990,656 (1.60%)"]),
    # Trained directly (no re-parameterisation): trained = stored = 2·L·l·d.
    (["model=gpt2", "method=prefix", "budget=small", "method.components.prefix.reparam=false"], 147_456, 147_456,
     ["trainable 147,456 (0.12%)"]),
])
def test_count_reports_trained_and_stored(args, trainable, stored, lines, capsys):
    record = count_main(args)
    assert (record["total"], record["trainable"], record["stored"]) == (124_439_808, trainable, stored)
    out = capsys.readouterr().out.splitlines()
    assert all(line in out for line in lines)


def test_smollm2_prefix_uses_the_kv_heads():
    # GQA: the prefix rows are per KV head (3 × 64 = 192 per layer and side): 2·30·8·192.
    record = count_main(["model=smollm2_135m", "method=prefix", "budget=small"])
    assert record["stored"] == 2 * 30 * 8 * 192
    assert record["trainable"] == 8 * 576 + (576 * 512 + 512) + (512 * 2 * 30 * 192 + 2 * 30 * 192)


def test_a_short_training_run_completes(tmp_path):
    from kpeft.compose import compose

    cfg = compose(["model=tiny_gpt2", "task=demo_reverse", "method=prefix", "budget=small", "train.epochs=1",
                   f"output_root={tmp_path}", "train.progress=false",
                   "task.options.n_train=128", "task.options.n_val=32", "task.options.n_test=32"])
    record = run(cfg)
    assert record["status"] == "complete" and record["training"]["steps"] == 4
    assert record["params"]["stored"] == 2 * 2 * 8 * 32 < record["params"]["trainable"]
