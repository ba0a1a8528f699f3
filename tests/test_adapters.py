"""Adapter baselines (Lin et al. 2020; Karimi Mahabadi et al. 2021; He et al. 2022; [IT] Table 5): Adapter-r (Lin), the parallel adapter, the MAM
adapter, MAM inducer-tuning, Compacter: counts, init, the hooks' exact formula and place, the PHM product,
the shared rule tensor, training. The generic checks run on every variant in tests/test_matrix.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import inputs, method_cfg, output, randomise, tiny_model
from torch import nn

from kpeft.backbones import describe
from kpeft.count import main as count_main
from kpeft.methods import apply_method
from kpeft.methods.adapters import SEQUENTIAL_ATTR, Adapter, CompacterAdapter, PHMLinear
from kpeft.methods.block import PARALLEL_ATTR
from kpeft.train import run


def adapt(model, method: str, *overrides: str, budget: str):
    return apply_method(model, describe(model), method_cfg(method, *overrides, budget=budget))


def of_type(adapted, cls) -> list:
    return [c for c in adapted.all_components() if isinstance(c, cls)]


# ---------------------------------------------------------------- counts (meta device)


@pytest.mark.parametrize(
    ("args", "trainable", "stored"),
    [
        # Adapter-r (Lin, with LN_a): 12 × (1537 r + 2304), [KM] Table 1, [IT] Table 1
        (["model=gpt2", "method=adapter", "budget=tiny"], 101_424, 101_424),
        (["model=gpt2", "method=adapter", "budget=small"], 175_200, 175_200),
        (["model=gpt2", "method=adapter", "budget=intermediate"], 2_019_600, 2_019_600),
        (["model=gpt2", "method=adapter", "budget=intermediate", "method.components.adapter.placement=attn_out"],
         2_019_600, 2_019_600),
        # Parallel adapter: 12 × (1537 k + 768).
        (["model=gpt2", "method=parallel_adapter", "budget=intermediate"], 2_001_168, 2_001_168),
        (["model=roberta_base", "method=parallel_adapter", "budget=nlu"], 599_424, 599_424),
        # MAM adapter: stored prefix 2·L·l·d + parallel adapter; trained with He et al.'s prefix MLP.
        (["model=gpt2", "method=mam_adapter", "budget=intermediate", "method.components.prefix.reparam=false"],
         2_001_096, 2_001_096),
        (["model=gpt2", "method=mam_adapter", "budget=intermediate"], 17_274_344, 2_001_096),
        (["model=roberta_base", "method=mam_adapter", "budget=nlu", "method.components.prefix.reparam=false"],
         599_232, 599_232),
        # MAM inducer ([IT] Table 5): the printed 1.61% without the adapter LN, 1.62% with it.
        (["model=gpt2", "method=mam_inducer", "budget=intermediate"], 2_001_816, 2_001_816),
        (["model=gpt2", "method=mam_inducer", "budget=intermediate", "budget.mam_inducer.layernorm=true"],
         2_020_248, 2_020_248),
        (["model=roberta_base", "method=mam_inducer", "budget=nlu"], 599_760, 599_760),
        # Compacter k 192, n 4: 24 × 2,880 + 64 (one shared rule); + a LayerNorm per adapter.
        (["model=gpt2", "method=compacter", "budget=tiny", "budget.compacter.layernorm=false"], 69_184, 69_184),
        (["model=gpt2", "method=compacter", "budget=tiny"], 106_048, 106_048),
        (["model=gpt2", "method=compacter", "budget=tiny", "method.train_layernorm=true"],
         106_048 + 25 * 1_536, 106_048 + 25 * 1_536),
        (["model=gpt2", "method=compacter", "budget=tiny", "budget.compacter.layernorm=false",
          "method.train_layernorm=true"], 107_584, 107_584),  # Karimi Mahabadi et al. 2021
    ],
)
def test_adapter_counts(args, trainable, stored, capsys):
    record = count_main(args)
    assert (record["trainable"], record["stored"]) == (trainable, stored)
    capsys.readouterr()


def test_printed_percentages(capsys):
    pct = {
        ("gpt2", "adapter", "tiny"): 0.08, ("gpt2", "adapter", "small"): 0.14,
        ("gpt2", "adapter", "intermediate"): 1.62, ("gpt2", "mam_inducer", "intermediate"): 1.61,
        ("gpt2", "parallel_adapter", "intermediate"): 1.61, ("roberta_base", "mam_inducer", "nlu"): 0.48,
    }
    for (model, method, budget), p in pct.items():
        record = count_main([f"model={model}", f"method={method}", f"budget={budget}"])
        assert round(record["trainable_pct"], 2) == p
    record = count_main(["model=gpt2", "method=mam_adapter", "budget=intermediate"])
    assert round(record["stored_pct"], 2) == 1.61
    capsys.readouterr()


# ---------------------------------------------------------------- init
# (a zero-initialised up projection = the frozen model, on every family: tests/test_matrix.py)


def test_hf_normal_init_is_not_zero_and_matches_gpt2_init():
    adapted = adapt(tiny_model("gpt2"), "adapter", budget="small")
    (a, *_) = of_type(adapted, Adapter)
    assert a.ln is not None and torch.equal(a.ln.weight, torch.ones(32)) and torch.equal(a.ln.bias, torch.zeros(32))
    assert torch.equal(a.down.bias, torch.zeros(8)) and torch.equal(a.up.bias, torch.zeros(32))
    assert a.up.weight.abs().sum() > 0 and 0.005 < a.down.weight.std().item() < 0.05


# ---------------------------------------------------------------- the hooks: formula and place


def _lin(a: Adapter, h: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2020 by hand: W_up ReLU(W_down LN_a(h) + b_d) + b_u, scaled."""
    if a.ln is not None:
        h = nn.functional.layer_norm(h, h.shape[-1:], a.ln.weight, a.ln.bias, a.ln.eps)
    return (torch.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias) * a.scaling


def _capture(module: nn.Module, store: dict, key: str, what: str = "out"):
    def hook(mod, args, out):
        store[key] = (args[0] if what == "in" else (out[0] if isinstance(out, tuple) else out)).detach().clone()

    return module.register_forward_hook(hook)


def test_block_end_adapter_adds_the_formula_to_the_block_output():
    model = tiny_model("gpt2")
    batch = inputs("gpt2")
    frozen = copy.deepcopy(model)
    adapted = adapt(model, "adapter", budget="small")
    randomise(adapted)
    a0 = of_type(adapted, Adapter)[0]
    assert adapted.model.transformer.h[0]._modules[SEQUENTIAL_ATTR][0] is a0
    # Block 0's frozen output h (same input: embeddings are frozen) → h + Δ(h) enters block 1.
    seen: dict = {}
    hooks = [_capture(frozen.transformer.h[0], seen, "h"), _capture(model.transformer.h[1].ln_1, seen, "x1", "in")]
    output(frozen, batch), output(model, batch)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen["x1"], seen["h"] + _lin(a0, seen["h"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "roberta_cls"])
def test_attn_out_adapter_rewrites_the_o_projection_output(family):
    model = tiny_model(family)
    adapted = adapt(model, "adapter", "method.components.adapter.placement=attn_out", budget="small")
    randomise(adapted)
    a0 = of_type(adapted, Adapter)[0]
    o = adapted.anatomy.layers[0].self_attention.o
    module = getattr(o.parent, o.attr)
    assert module._modules[SEQUENTIAL_ATTR][0] is a0
    seen: dict = {}
    hook = _capture(module, seen, "out")  # registered after the adapter's hook: sees h + Δ(h)
    pre: dict = {}
    pre_hook = module.register_forward_pre_hook(lambda m, a: pre.update(x=a[0].detach().clone()))
    output(model, inputs(family))
    hook.remove()
    pre_hook.remove()
    with torch.no_grad():
        h = nn.functional.linear(pre["x"], module.weight.T if family == "gpt2" else module.weight)
        h = h + module.bias
        torch.testing.assert_close(seen["out"], h + _lin(a0, h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "roberta_cls"])
def test_parallel_adapter_adds_s_times_the_formula_of_the_ffn_input(family):
    model = tiny_model(family)
    adapted = adapt(model, "parallel_adapter", budget="small")
    randomise(adapted)
    a0 = of_type(adapted, Adapter)[0]
    assert a0.ln is None and a0.scaling == 4.0
    layer = adapted.anatomy.layers[0]
    assert layer.ffn._modules[PARALLEL_ATTR][0] is a0
    seen: dict = {}
    hooks = [_capture(layer.ffn, seen, "x", "in"), _capture(layer.ffn_out, seen, "y")]
    output(model, inputs(family))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        a0.handle.remove()  # the bare FFN on the captured input
        ffn = layer.ffn(seen["x"]) if family == "gpt2" else layer.ffn_out(layer.ffn(seen["x"]))
        torch.testing.assert_close(seen["y"], ffn + _lin(a0, seen["x"]), rtol=1e-5, atol=1e-6)


def test_mam_inducer_gpt2_adapter_is_lin_style_parallel_with_optional_ln():
    adapted = adapt(tiny_model("gpt2"), "mam_inducer", "budget.mam_inducer.layernorm=true", budget="intermediate")
    a0 = of_type(adapted, Adapter)[0]
    assert a0.ln is not None and a0.scaling == 1.0 and a0.init == "hf_normal" and a0.up.weight.abs().sum() > 0
    assert adapted.anatomy.layers[0].ffn._modules[PARALLEL_ATTR][0] is a0
    assert set(adapted.components) == {"inducer", "lora", "adapter"}


def test_sequential_handle_remove_restores_the_backbone():
    model = tiny_model("gpt2")
    batch = inputs("gpt2")
    before = output(model, batch)
    adapted = adapt(model, "compacter", "budget.compacter.bottleneck=8", budget="tiny")
    randomise(adapted)
    assert not torch.equal(output(model, batch), before)
    for comp in of_type(adapted, CompacterAdapter):
        comp.handle.remove()
    assert not any(SEQUENTIAL_ATTR in n for n, _ in model.named_modules())
    assert torch.equal(output(model, batch), before)


# ---------------------------------------------------------------- Compacter / PHM


def test_phm_weight_is_the_sum_of_kronecker_products_and_forward_uses_it():
    g = torch.Generator().manual_seed(0)
    rule = nn.Parameter(torch.randn(4, 4, 4, generator=g, dtype=torch.float64))
    for d_in, d_out, rank in [(32, 8, 1), (8, 32, 1), (12, 20, 2)]:
        phm = PHMLinear(d_in, d_out, rule, rank=rank).double()
        with torch.no_grad():
            phm.bias.normal_()
        B = phm.s @ phm.t
        W = sum(torch.kron(rule[i], B[i]) for i in range(4))
        assert W.shape == (d_in, d_out)
        torch.testing.assert_close(phm.weight(), W)
        x = torch.randn(3, 5, d_in, generator=g, dtype=torch.float64)
        torch.testing.assert_close(phm(x), x @ W + phm.bias)


def test_compacter_shares_one_rule_tensor_and_places_two_adapters_per_layer():
    model = tiny_model("gpt2")
    adapted = adapt(model, "compacter", "budget.compacter.bottleneck=8", budget="tiny")
    comps = of_type(adapted, CompacterAdapter)
    assert len(comps) == 2 * len(adapted.anatomy.layers)
    rules = {id(c.down.rule) for c in comps} | {id(c.up.rule) for c in comps}
    assert len(rules) == 1
    names = [n for n, _ in adapted.trainable_parameters() if n.endswith(".rule")]
    assert len(names) == 1  # the optimizer and the state dict see it once
    layer = adapted.anatomy.layers[0]
    assert model.transformer.h[0].attn.c_proj._modules[SEQUENTIAL_ATTR][0] is comps[0]
    assert layer.ffn_out._modules[SEQUENTIAL_ATTR][0] is comps[1]
    # 2 layers × 2 adapters × (down 4·8 + 4·2 + 8, up 4·2 + 4·8 + 32, LN 64) + 64.
    per = (4 * 8 + 4 * 2 + 8) + (4 * 2 + 4 * 8 + 32) + 64
    assert adapted.count().trainable == adapted.count().stored == 4 * per + 64
    # The gradient reaches the shared rule from every adapter.
    randomise(adapted)
    output_grad = model(**inputs("gpt2")).logits.sum()
    output_grad.backward()
    assert comps[0].down.rule.grad is not None and comps[0].down.rule.grad.abs().sum() > 0


def test_compacter_adds_the_phm_formula_to_the_ffn_output():
    model = tiny_model("gpt2")
    adapted = adapt(model, "compacter", "budget.compacter.bottleneck=8", budget="tiny")
    randomise(adapted, scale=0.3)
    comp = of_type(adapted, CompacterAdapter)[1]  # layer 0, after the FFN output
    layer = adapted.anatomy.layers[0]
    seen: dict = {}
    pre = layer.ffn_out.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    hook = _capture(layer.ffn_out, seen, "out")
    output(model, inputs("gpt2"))
    pre.remove()
    hook.remove()
    with torch.no_grad():
        h = seen["x"] @ layer.ffn_out.weight + layer.ffn_out.bias
        z = nn.functional.layer_norm(h, (32,), comp.ln.weight, comp.ln.bias, comp.ln.eps)
        z = nn.functional.gelu(z @ comp.down.weight() + comp.down.bias, approximate="tanh")
        torch.testing.assert_close(seen["out"], h + z @ comp.up.weight() + comp.up.bias, rtol=1e-5, atol=1e-6)


def test_compacter_separate_rules_option():
    adapted = adapt(
        tiny_model("gpt2"), "compacter", "budget.compacter.bottleneck=8",
        "method.components.compacter.shared_rule=false", budget="tiny",
    )
    comps = of_type(adapted, CompacterAdapter)
    assert len({id(c.down.rule) for c in comps}) == len(comps)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("method", "budget", "overrides"),
    [
        ("adapter", "tiny", ()),
        ("parallel_adapter", "small", ()),
        ("mam_adapter", "intermediate", ("budget.mam_adapter.bottleneck=8", "method.components.prefix.mid_dim=16")),
        ("mam_inducer", "intermediate", ("budget.mam_inducer.bottleneck=8",)),
        ("compacter", "tiny", ("budget.compacter.bottleneck=8",)),
    ],
)
def test_a_short_training_run_completes(method, budget, overrides, tmp_path):
    from kpeft.compose import compose

    cfg = compose([
        "model=tiny_gpt2", "task=demo_reverse", f"method={method}", f"budget={budget}", "train.epochs=1",
        f"output_root={tmp_path}", "train.progress=false", *overrides,
    ])
    record = run(cfg)
    assert record["status"] == "complete"
    assert math.isfinite(record["metrics"]["test"]["loss"])
    assert record["params"]["trainable"] > 0
