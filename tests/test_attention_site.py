"""The attention site (kpeft/methods/attention_site.py): kpeft's registered attention function
reproduces each family's own eager attention exactly — as a fallback for modules without
components and through the site's own computation with a no-op component — with padding,
T5's relative bias, Llama's GQA/RoPE and sdpa-style skipped causal masks; no loop over heads."""

from __future__ import annotations

import pytest
import torch
from helpers import config, inputs, method_cfg, output, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.methods import apply_method
from kpeft.methods.attention_site import (
    ATTN_IMPLEMENTATION,
    SITE_ATTR,
    AttentionComponent,
    AttentionSite,
    get_site,
    use_kpeft_attention,
)

FOUR = ["gpt2", "roberta_cls", "t5", "llama"]


def eager_reference(family: str, batch) -> tuple[torch.nn.Module, torch.Tensor]:
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    return model, output(model, batch)


@pytest.mark.parametrize("family", FOUR)
def test_the_registered_function_without_components_is_the_eager_attention_exactly(family):
    batch = inputs(family)  # row 0 is right-padded
    model, reference = eager_reference(family, batch)
    use_kpeft_attention(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    if family == "t5":  # every stack follows (T5 keeps its own config per stack)
        assert model.encoder.config._attn_implementation == model.decoder.config._attn_implementation == "kpeft"
    assert torch.equal(output(model, batch), reference)
    if family in ("roberta_cls", "t5"):  # bidirectional: the padding mask does arrive
        other = {k: v.clone() for k, v in batch.items()}
        other["input_ids"][0, -2:] = 5  # change only the padded tokens of row 0
        changed = output(model, other)
        assert torch.equal(changed, reference)


class NoOp(AttentionComponent):
    """An attention component that changes nothing: the site computes attention itself."""


@pytest.mark.parametrize("family", FOUR)
def test_the_site_computation_with_a_no_op_component_is_the_eager_attention_exactly(family):
    batch = inputs(family)
    model, reference = eager_reference(family, batch)
    use_kpeft_attention(model)
    anatomy = describe(model)
    calls = []
    for _, att in anatomy.attentions("all"):  # T5's cross-attention too
        site = get_site(att)
        site.components.append(NoOp())
        original = site.attend
        site.attend = lambda *a, _o=original, **k: (calls.append(1), _o(*a, **k))[1]
    assert torch.equal(output(model, batch), reference)
    assert len(calls) == len(anatomy.attentions("all"))  # every module went through its site


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_skipped_causal_mask_is_applied_by_the_site(family):
    # With sdpa-style masks a causal layer may receive mask=None (no padding); the site must
    # then apply causality itself, with prefix columns visible.
    model = tiny_model(family)
    att = describe(model).attentions()[0][1]
    site = AttentionSite(att)
    site.components.append(NoOp())
    g = torch.Generator().manual_seed(0)
    H, kv, p, n = att.num_heads, att.num_kv_heads, att.head_dim, 5
    q = torch.randn(2, H, n, p, generator=g)
    k, v = torch.randn(2, kv, n, p, generator=g), torch.randn(2, kv, n, p, generator=g)
    mask = torch.triu(torch.full((n, n), torch.finfo(torch.float32).min), 1)[None, None].expand(2, 1, n, n)
    explicit, _ = site.attend(att.module, q, k, v, mask, 0.3, 0.0)
    skipped, _ = site.attend(att.module, q, k, v, None, 0.3, 0.0)
    assert torch.equal(explicit, skipped)
    boolean, _ = site.attend(att.module, q, k, v, mask == 0, 0.3, 0.0)  # a boolean "may attend" mask
    assert torch.equal(explicit, boolean)


def test_the_site_is_a_submodule_and_methods_without_attention_components_keep_sdpa():
    model = tiny_model("gpt2")
    apply_method(model, describe(model), method_cfg("lora"))
    assert model.config._attn_implementation == "sdpa"
    model = tiny_model("gpt2")
    apply_method(model, describe(model), method_cfg("inducer", budget="intermediate"))
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    names = [n for n, _ in model.named_parameters() if SITE_ATTR in n]
    assert names and all(n.startswith("transformer.h.") for n in names)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("method", "budget"), [("inducer", "intermediate"), ("inducer_adaptive", "intermediate"),
                                                ("inducer_gating", "intermediate"), ("prefix", "small")])
def test_no_loop_over_heads(method, budget):
    # docs/methods.md: the number of tensor ops of a forward does not depend on the number of heads.
    counts = []
    for heads in (2, 4):
        cfg = config("model=tiny_gpt2", f"model.architecture.n_head={heads}")
        model = load_model(cfg.model, "causal_lm", seed=0).eval()
        apply_method(model, describe(model), method_cfg(method, budget=budget))
        with torch.no_grad(), OpCounter() as counter:
            model(**inputs("gpt2"))
        counts.append(counter.count)
    assert counts[0] == counts[1]
