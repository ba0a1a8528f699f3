"""(IA)³ (Liu et al. 2022), the worked example of docs/extending.md: its own equations — equality with
PEFT's IA3 given the same vectors, the merged weights W diag(l_k) and diag(l_ff) W_2, the count. The
generic checks (zero-init = frozen, merge round trip, save/load, cache, padding, gradients):
tests/test_matrix.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import config, inputs, method_cfg, output, randomise, tiny_model

from kpeft.backbones import describe
from kpeft.count import count_parameters
from kpeft.methods import apply_method
from kpeft.methods.base import AdaptedProjection
from kpeft.methods.ia3 import InputScale, OutputScale


def ia3(model):
    return apply_method(model, describe(model), method_cfg("ia3"))


# PEFT's module names for the keys, values and the FFN's output projection of each family.
PEFT_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "t5": (["k", "v", "wo"], ["wo"])}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations PEFT triggers
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_our_ia3_equals_peft_ia3_given_the_same_vectors(family):
    peft = pytest.importorskip("peft")
    model = tiny_model(family)
    twin = copy.deepcopy(model)
    adapted = ia3(model)
    randomise(adapted)
    targets, feedforward = PEFT_TARGETS[family]
    peft_model = peft.get_peft_model(
        twin, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    ).eval()
    peft_modules = dict(peft_model.named_modules())
    copied = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, AdaptedProjection):
                (ours,) = module.branches
                theirs = peft_modules[f"base_model.model.{name}"].ia3_l["default"]
                theirs.copy_(ours.scale.view_as(theirs))  # (d_out, 1) on k/v, (1, d_in) on the FFN
                copied += 1
    assert copied == sum(1 for n, _ in twin.named_modules() if n.rsplit(".", 1)[-1] in targets)
    batch = inputs(family)
    torch.testing.assert_close(output(model, batch), output(peft_model, batch), rtol=1e-5, atol=1e-5)


def test_gpt2_rescales_the_key_and_value_blocks_of_c_attn_and_the_rows_of_c_proj():
    model = tiny_model("gpt2")
    frozen = copy.deepcopy(model)
    adapted = ia3(model)
    randomise(adapted)
    branches = list(adapted.all_components())
    adapted.merge()
    d = model.config.n_embd
    for i, block in enumerate(model.transformer.h):
        l_k, l_v = (b.scale for b in branches if isinstance(b, OutputScale) and b.projection.parent is block.attn)
        (l_ff,) = (b.scale for b in branches if isinstance(b, InputScale) and b.projection.parent is block.mlp)
        w0, b0 = frozen.transformer.h[i].attn.c_attn.weight, frozen.transformer.h[i].attn.c_attn.bias
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias
        torch.testing.assert_close(w[:, :d], w0[:, :d], rtol=0, atol=0)  # queries untouched
        torch.testing.assert_close(w[:, d : 2 * d], w0[:, d : 2 * d] * l_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(w[:, 2 * d :], w0[:, 2 * d :] * l_v, rtol=0, atol=1e-6)
        torch.testing.assert_close(b[d : 2 * d], b0[d : 2 * d] * l_k, rtol=0, atol=1e-6)
        c_proj0 = frozen.transformer.h[i].mlp.c_proj.weight  # Conv1D: (d_ff, d)
        torch.testing.assert_close(block.mlp.c_proj.weight, l_ff[:, None] * c_proj0, rtol=0, atol=1e-6)


def test_count_is_two_vectors_per_attention_and_one_per_ffn():
    # GPT-2 small: 12 × (768 + 768 + 3,072); T5-base: 12 encoder × (2·768 + 3,072) + 12 decoder × (4·768 + 3,072)
    assert count_parameters(config("model=gpt2", "method=ia3")).trainable == 55_296
    t5 = count_parameters(config("model=t5_base", "method=ia3")).trainable
    assert t5 == 12 * (2 * 768 + 3072) + 12 * (4 * 768 + 3072) == 129_024
