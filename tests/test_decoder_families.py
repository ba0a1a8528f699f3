"""Mistral, Qwen2 (q/k/v biases) and Phi-3 (fused qkv_proj) through the Llama anatomy
(docs/backbones.md): weight sites merge to the unmerged outputs (LoRA, Kernel-mix, KronA), attention
sites decode with a cache as without (prefix, inducer), adapters start at the frozen model; Phi-3
with Llama's weights computes what Llama computes, with and without methods."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    check_batched_left_padded_generation,
    check_merge_round_trip,
    config,
    inputs,
    method_cfg,
    output,
    randomise,
)

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.errors import KpeftError
from kpeft.methods import apply_method
from kpeft.methods.base import WeightComponent

FAMILIES = ["mistral", "qwen2", "phi3"]
WEIGHT_METHODS = {  # method: (budget, overrides)
    "lora": ("small", ("method.components.lora.r=4", "method.components.lora.dropout=0.0")),
    "kernel_mix_qvo": ("intermediate", ("method.components.kernel_mix.dropout=0.0",)),
    "kernel_mix_lite_qv": ("small", ("method.components.kernel_mix.dropout=0.0",)),
    "krona": ("t5_glue", ("budget.krona.a_shape=[4,8]", "budget.krona.b_shape=null")),
}


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """conf/model/tiny_<family>.yaml, random init, fp32, eval mode."""
    return load_model(config(f"model=tiny_{family}").model, "causal_lm", seed=seed).float().eval()


def adapt(model, method: str, *overrides: str, budget: str = "small"):
    return apply_method(model, describe(model), method_cfg(method, *overrides, budget=budget))


def _ids(batch=2, seq=9, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, seq), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_anatomy_blocks_are_the_models_own_q_k_v(family):
    model = tiny(family)
    att = describe(model).layers[0].self_attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim, att.rotary, att.causal) == (4, 2, 8, True, True)
    assert [(p.d_in, p.d_out) for p in (att.q, att.k, att.v, att.o)] == [(32, 32), (32, 16), (32, 16), (32, 32)]
    assert [p.has_bias for p in (att.q, att.k, att.v, att.o)] == [family == "qwen2"] * 3 + [False]
    x = torch.randn(3, 32)
    sa = att.module
    if family == "phi3":  # q | k | v row blocks of the fused Linear, as the model splits its output
        qkv = sa.qkv_proj(x)
        want = (qkv[:, :32], qkv[:, 32:48], qkv[:, 48:])
    else:
        want = (sa.q_proj(x), sa.k_proj(x), sa.v_proj(x))
    for proj, w in zip((att.q, att.k, att.v), want):
        b = proj.bias()
        torch.testing.assert_close(x @ proj.weight() + (0 if b is None else b), w)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(WEIGHT_METHODS))
def test_weight_sites_merge_to_the_unmerged_outputs(family, method):
    model = tiny(family)
    batch = inputs("llama")
    frozen = output(model, batch)
    budget, overrides = WEIGHT_METHODS[method]
    adapted = adapt(model, method, *overrides, budget=budget)
    randomise(adapted)
    unmerged = output(model, batch)
    assert (unmerged - frozen).abs().max() > 1e-2 * frozen.abs().max()
    branches = [c for c in adapted.all_components() if isinstance(c, WeightComponent)]
    check_merge_round_trip(adapted, batch, branches, unmerged)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prefix", "inducer"])
def test_attention_sites_decode_with_a_cache_as_without(family, method):
    model = tiny(family)
    adapted = adapt(model, method, budget="small" if method == "prefix" else "intermediate")
    randomise(adapted, scale=0.3)
    ids = _ids()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    check_batched_left_padded_generation(model, _ids(2, 6))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, overrides", [
    ("adapter", ("method.components.adapter.init=lora",)),
    ("parallel_adapter", ()),
])
def test_zero_initialised_adapters_reproduce_the_frozen_model(family, method, overrides):
    model = tiny(family)
    batch = inputs("llama")
    before = output(model, batch)
    adapted = adapt(model, method, *overrides)
    assert torch.equal(output(adapted.model, batch), before)
    randomise(adapted)
    assert not torch.allclose(output(adapted.model, batch), before)


def llama_twin_of(phi3: torch.nn.Module) -> torch.nn.Module:
    """tiny_llama with Phi-3's weights, q/k/v and gate/up unfused."""
    llama = load_model(config("model=tiny_llama", "+model.architecture.rms_norm_eps=1e-5").model, "causal_lm")
    src = phi3.state_dict()
    state = {}
    for name, value in src.items():
        if "qkv_proj" in name:
            q, k, v = value.split([32, 16, 16])
            for part, w in zip("qkv", (q, k, v)):
                state[name.replace("qkv_proj", f"{part}_proj")] = w
        elif "gate_up_proj" in name:
            gate, up = value.chunk(2)
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        else:
            state[name] = value
    llama.load_state_dict(state)
    return llama.float().eval()


@pytest.mark.parametrize("method", [None, "lora", "kernel_mix_qvo", "kernel_mix_lite_qv", "prefix", "inducer"])
def test_phi3_computes_what_llama_computes_with_the_same_weights(method):
    phi3 = tiny("phi3")
    llama = llama_twin_of(phi3)
    batch = inputs("llama")
    if method is not None:
        budget, overrides = WEIGHT_METHODS.get(method, ("small" if method == "prefix" else "intermediate", ()))
        for m in (phi3, llama):
            randomise(adapt(m, method, *overrides, budget=budget), scale=0.3)  # same seed: the same values
    torch.testing.assert_close(output(phi3, batch), output(llama, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checkpoint_directory_loads_through_name_or_path(family, tmp_path):
    """``model.name_or_path`` of a saved checkpoint (family llama): the same weights, and a method
    installs on it."""
    saved = tiny(family)
    saved.save_pretrained(tmp_path)
    mcfg = config(f"model=tiny_{family}", "model.init=pretrained", f"model.name_or_path={tmp_path}").model
    loaded = load_model(mcfg, "causal_lm").eval()
    assert type(loaded) is type(saved)
    batch = inputs("llama")
    torch.testing.assert_close(output(loaded, batch), output(saved, batch))
    randomise(adapt(loaded, "inducer", budget="intermediate"))
    assert not torch.allclose(output(loaded, batch), output(saved, batch))


def test_other_decoder_types_are_refused_in_one_line(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("gemma", vocab_size=256, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    for overrides in (("model.architecture.model_type=gemma",), ("model.init=pretrained", f"model.name_or_path={tmp_path}")):
        with pytest.raises(KpeftError, match="is a gemma checkpoint, which kpeft does not support") as err:
            load_model(config("model=tiny_llama", *overrides).model, "causal_lm")
        assert "\n" not in str(err.value) and "mistral, phi3, qwen2" in str(err.value)
