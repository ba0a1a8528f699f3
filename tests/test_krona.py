"""KronA, KronA^B, KronA^B_res (Edalati et al. 2022) and the block site (parallel to the FFN): the
Kronecker product without forming it, the merged weights, init, the hooks, shapes, counts, training.
The generic checks (zero-init = frozen, merge round trip, save/load, ...): tests/test_matrix.py."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, inputs, method_cfg, output, randomise, tiny_model
from torch import nn

from kpeft.backbones import describe
from kpeft.count import main as count_main
from kpeft.errors import KpeftError
from kpeft.methods import apply_method
from kpeft.methods.base import AdaptedProjection
from kpeft.methods.block import PARALLEL_ATTR, BlockComponent, attach_parallel_ffn
from kpeft.methods.kron import KronA, KronAB, factor_pairs, kron_matmul, kron_shapes
from kpeft.methods.parameters import LayerNormTuning
from kpeft.train import run

ALL = list(FAMILIES)
TABLE_9 = [(48, 16), (32, 24), (3, 256), (24, 32), (2, 384), (192, 4), (12, 64)]  # A; B reversed
# Valid for the tiny models' width 32 (Llama's GQA v_proj is 32 -> 16: B derived from A there).
TINY = ("[4,8]", "[8,4]")


def krona(model, *overrides: str, a: str = TINY[0], b: str | None = TINY[1], ln: bool = False, **kw):
    """The real krona.yaml at budget t5_glue (our KronA placement, docs/deviations.md: every attention module), with
    shapes valid for the tiny models."""
    mcfg = method_cfg(
        "krona", f"budget.krona.a_shape={a}", f"budget.krona.b_shape={b or 'null'}",
        f"budget.krona.train_layernorm={str(ln).lower()}", *overrides, budget="t5_glue",
    )
    return apply_method(model, describe(model), mcfg, **kw)


def krona_b(model, *overrides: str, method: str = "krona_b", ln: bool = False, **kw):
    mcfg = method_cfg(
        method, f"budget.krona_b.a_shape={TINY[0]}", f"budget.krona_b.b_shape={TINY[1]}",
        f"budget.krona_b.train_layernorm={str(ln).lower()}", *overrides, budget="t5_glue",
    )
    return apply_method(model, describe(model), mcfg, **kw)


def of_type(adapted, cls) -> list:
    return [c for c in adapted.all_components() if isinstance(c, cls)]


# ---------------------------------------------------------------- the Kronecker product


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [(a, a[::-1]) for a in TABLE_9] + [((2, 384), (384, 2)), ((4, 6), (8, 2)), ((3, 5), (7, 2)), ((1, 7), (5, 1))],
)
def test_the_reshape_product_equals_x_times_torch_kron(a_shape, b_shape):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*a_shape, generator=g, dtype=torch.float64)
    B = torch.randn(*b_shape, generator=g, dtype=torch.float64)
    d_in, d_out = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    x = torch.randn(3, 5, d_in, generator=g, dtype=torch.float64)
    expected = x @ torch.kron(A, B)  # row convention: y = x (A ⊗ B), (d_in, d_out)
    assert expected.shape == (3, 5, d_out)
    torch.testing.assert_close(kron_matmul(x, A, B), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kron_matmul(x[0, 0], A, B), expected[0, 0], rtol=1e-10, atol=1e-10)  # no batch
    if a_shape in TABLE_9 and b_shape == a_shape[::-1]:
        assert A.numel() + B.numel() == 1_536  # = LoRA rank 1 on 768×768 (Table 9)


def test_every_table_9_shape_fits_a_768_matrix():
    for a in TABLE_9:
        assert kron_shapes(a, a[::-1], 768, 768) == (a, a[::-1])
        assert kron_shapes(a, None, 768, 768) == (a, a[::-1])  # B derived from A
        assert kron_shapes(None, a[::-1], 768, 768) == (a, a[::-1])


def test_krona_branch_is_s_times_x_kron_and_delta_weight_is_torch_kron():
    model = tiny_model("llama")
    adapted = krona(model, "method.components.krona.scale=2.5", b=None)
    randomise(adapted)
    q, v = of_type(adapted, KronA)[:2]  # layer 0: q (32 -> 32), v (32 -> 16, GQA)
    assert (tuple(q.A.shape), tuple(q.B.shape)) == ((4, 8), (8, 4))
    assert (tuple(v.A.shape), tuple(v.B.shape)) == ((4, 8), (8, 2))  # B derived: (32/4, 16/8)
    for branch in (q, v):
        assert branch.delta_weight().shape == (branch.d_in, branch.d_out)
        torch.testing.assert_close(branch.delta_weight(), 2.5 * torch.kron(branch.A, branch.B))
        x = torch.randn(2, 5, branch.d_in)
        torch.testing.assert_close(branch(x), x @ branch.delta_weight(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- KronA on the four families


@pytest.mark.parametrize("family", ALL)
def test_krona_adapts_q_and_v_of_every_attention_and_only_b_starts_at_zero(family):
    # (that it then gives the frozen model's outputs, and merges, is checked in tests/test_matrix.py)
    model = tiny_model(family)
    adapted = krona(model, b=None if family == "llama" else TINY[1])
    branches = of_type(adapted, KronA)
    n_attentions = len(describe(model).attentions("all"))  # t5_glue: all (T5: cross too)
    assert len(branches) == 2 * n_attentions
    assert all(torch.count_nonzero(b.B) == 0 and torch.count_nonzero(b.A) > 0 for b in branches)


def test_gpt2_krona_merges_into_the_q_and_v_column_blocks_of_c_attn():
    model = tiny_model("gpt2")
    d = model.config.n_embd
    adapted = krona(model)
    randomise(adapted)
    attn = model.transformer.h[1].attn
    assert isinstance(attn.c_attn, AdaptedProjection) and not isinstance(attn.c_proj, AdaptedProjection)
    w0, b0 = attn.c_attn.weight.detach().clone(), attn.c_attn.bias.detach().clone()
    adapted.merge()
    dw = attn.c_attn.weight.detach() - w0
    q, v = of_type(adapted, KronA)[2:4]  # layer 1: q then v, one branch per 32×32 slice
    assert (q.projection.start, v.projection.start) == (0, 2 * d)
    torch.testing.assert_close(dw[:, :d], torch.kron(q.A, q.B), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw[:, 2 * d :], torch.kron(v.A, v.B), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(dw[:, d : 2 * d]) == 0  # k untouched
    assert torch.equal(attn.c_attn.bias, b0)  # KronA has no bias


def test_krona_init_is_kaiming_uniform_a_and_zero_b():
    adapted = krona(tiny_model("gpt2"), a="[32,16]", b="[1,2]")  # A (32, 16): a wide sample
    for branch in of_type(adapted, KronA):
        bound = 1 / math.sqrt(16)  # torch's kaiming_uniform_(A, a=√5) on the (m1, n1) = (32, 16) tensor
        assert branch.A.abs().max() <= bound and branch.A.abs().max() > 0.9 * bound
        assert torch.count_nonzero(branch.B) == 0 and branch.scaling == 1.0
    t = torch.empty(32, 16)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    assert t.abs().max() <= 1 / math.sqrt(16)


def test_bad_factor_shapes_give_a_clear_error():
    with pytest.raises(KpeftError) as info:
        krona(tiny_model("gpt2"), a="[4,7]", b="[8,4]")
    msg = str(info.value)
    assert "method 'krona' does not fit backbone 'gpt2'" in msg
    assert "a_shape=[4, 7] b_shape=[8, 4] do not fit decoder layer 0 self-attention q (32→32)" in msg
    assert "m1·m2 = d_in = 32 and n1·n2 = d_out = 32" in msg
    assert "valid (m1,m2): (1,32) (2,16) (4,8) (8,4) (16,2) (32,1)" in msg
    assert "e.g. a_shape=[4,8] b_shape=[8,4]" in msg and "\n" not in msg
    # The model is left untouched: every shape is checked before any branch is installed.
    model = tiny_model("llama")
    with pytest.raises(KpeftError, match=r"self-attention v \(32→16\).*valid \(n1,n2\): \(1,16\)"):
        krona(model)  # B = (8, 4) cannot serve Llama's GQA v_proj (32 -> 16)
    assert not any(isinstance(m, AdaptedProjection) for m in model.modules())
    with pytest.raises(KpeftError, match=r"KronA factors .* do not fit the FFN of encoder layer 0"):
        krona_b(tiny_model("roberta_base"), "budget.krona_b.a_shape=[3,8]")
    assert factor_pairs(12) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]


def test_krona_placement_and_layernorm_options():
    t5 = tiny_model("t5")
    self_only = krona(t5, "budget.krona.attention=self")
    assert len(of_type(self_only, KronA)) == 2 * 4
    with_ln = krona(tiny_model("t5"), ln=True)
    ln = of_type(with_ln, LayerNormTuning)
    assert len(ln) == 1
    trained = {n for n, p in with_ln.model.named_parameters() if p.requires_grad}
    norms = {n for n in trained if "layer_norm" in n}
    # tiny T5: encoder 2 blocks × 2 + final, decoder 2 blocks × 3 + final = 12 norms of width 32.
    assert len(norms) == 12 and all(n.endswith(".weight") for n in norms)
    assert with_ln.count().trainable == 2 * 6 * (32 + 32) + 12 * 32
    assert with_ln.mergeable  # LayerNorms train in place: nothing to fold


# ---------------------------------------------------------------- the block site


class Probe(BlockComponent):
    """A block component with a random dense map, to test the site itself."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__(d, d)
        self.lin = nn.Linear(d, d)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g) * 0.3)
            self.lin.bias.copy_(torch.randn(d, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _first_projection(ffn: nn.Module, ffn_out: nn.Module) -> nn.Module:
    """The FFN's first matmul (c_fc / intermediate.dense / wi / gate_proj): it receives the FFN input."""
    return next(m for m in ffn.modules() if m is not ffn and m is not ffn_out and hasattr(m, "weight"))


def _record(model, batch, layers, probes_first: bool = False):
    """FFN inputs (at the first matmul) and FFN outputs (at ffn_out) of every layer."""
    seen: dict[str, list] = {"in": [], "out": []}
    hooks = []
    for layer in layers:
        first = _first_projection(layer.ffn, layer.ffn_out)
        hooks.append(first.register_forward_pre_hook(lambda m, args: seen["in"].append(args[0])))
        hooks.append(layer.ffn_out.register_forward_hook(lambda m, args, out: seen["out"].append(out)))
    result = output(model, batch)
    for h in hooks:
        h.remove()
    return seen, result


@pytest.mark.parametrize("family", ALL)
def test_the_parallel_ffn_site_adds_exactly_the_component_of_the_ffn_input(family):
    model = tiny_model(family)
    batch = inputs(family)
    layers = describe(model).layers
    d = describe(model).hidden_size
    before, reference = _record(model, batch, layers)

    # Raw ffn_out outputs, recorded by hooks registered *before* the site's (they run first).
    raw: list[torch.Tensor] = []
    raw_hooks = [layer.ffn_out.register_forward_hook(lambda m, a, out: raw.append(out.clone())) for layer in layers]
    probes = [Probe(d, seed=i) for i in range(len(layers))]
    handles = [attach_parallel_ffn(layer, probe) for layer, probe in zip(layers, probes, strict=True)]
    after, adapted_out = _record(model, batch, layers)
    for h in raw_hooks:
        h.remove()
    assert not torch.equal(adapted_out, reference)
    # Execution order = layer order for every family here (T5: encoder, then decoder).
    for i, probe in enumerate(probes):
        with torch.no_grad():
            expected = raw[i] + probe(after["in"][i])  # x = the FFN input (what its first matmul sees)
        assert torch.equal(after["out"][i], expected)
    # The first FFN sees the frozen model's input: a manual computation from the frozen run.
    with torch.no_grad():
        assert torch.equal(after["out"][0], before["out"][0] + probes[0](before["in"][0]))
    # The component is part of the model (its parameters are the model's) and under the FFN.
    names = {n for n, _ in model.named_parameters()}
    assert sum(f".{PARALLEL_ATTR}." in n for n in names) == 2 * len(layers)

    for h in handles:
        assert h.attached
        h.remove()
        assert not h.attached and h.component.handle is None
    assert torch.equal(output(model, batch), reference)
    for layer in layers:
        assert not layer.ffn._forward_pre_hooks and not layer.ffn_out._forward_hooks
        assert PARALLEL_ATTR not in layer.ffn._modules
    assert not any(PARALLEL_ATTR in n for n, _ in model.named_parameters())


def test_a_deep_copy_runs_and_removes_its_own_components():
    model = tiny_model("llama")
    batch = inputs("llama")
    frozen = output(model, batch)
    adapted = krona_b(model)
    randomise(adapted)
    adapted_out = output(model, batch)
    twin = copy.deepcopy(model)
    assert torch.equal(output(twin, batch), adapted_out)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, KronAB):
                m.bias.add_(1.0)
    assert not torch.equal(output(twin, batch), adapted_out)  # the copy's hooks call the copy's modules
    assert torch.equal(output(model, batch), adapted_out)
    for m in [m for m in twin.modules() if isinstance(m, KronAB)]:
        m.handle.remove()
    assert torch.equal(output(twin, batch), frozen)
    assert torch.equal(output(model, batch), adapted_out)


def test_the_site_adds_before_dropout_and_residual():
    # T5: the FFN sub-layer returns h + Dropout(FFN(RMS-LN(h))); GPT-2's mlp returns Dropout(c_proj(·)).
    model = tiny_model("t5")
    layer = describe(model).layers[0]
    block_ff = model.encoder.block[0].layer[-1]
    probe = Probe(32)
    attach_parallel_ffn(layer, probe)
    seen = {}
    block_ff.register_forward_hook(lambda m, args, out: seen.update(h=args[0], y=out))
    layer.ffn_out.register_forward_hook(lambda m, args, out: seen.update(ffn=out))
    block_ff.layer_norm.register_forward_hook(lambda m, args, out: seen.update(x=out))
    output(model, inputs("t5"))
    with torch.no_grad():
        assert torch.equal(seen["y"], seen["h"] + seen["ffn"])  # eval: dropout is the identity
        x = seen["x"]
        base = layer.ffn.act(layer.ffn.wi(x)) @ layer.ffn.wo.weight.t()  # not wo(): its hook needs the FFN's x
        torch.testing.assert_close(seen["ffn"], base + probe(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- KronA^B, KronA^B_res


@pytest.mark.parametrize("family", ALL)
def test_zero_initialised_krona_b_res_adds_s_res_x(family):
    """KronA^B_res starts at FFN(X) + s_res·X (KronA^B, the same module without s_res, at the frozen
    model: tests/test_matrix.py)."""
    model = tiny_model(family)
    twin = copy.deepcopy(model)
    adapted = krona_b(model, method="krona_b_res")
    modules = of_type(adapted, KronAB)
    layers = describe(model).layers
    assert len(modules) == len(layers) and not adapted.mergeable
    assert all(m.n_modules == 2 and torch.count_nonzero(m.B) == 0 and torch.count_nonzero(m.A) > 0 for m in modules)
    # s_res = 1 per Kronecker module (two per FFN): FFN_out = FFN(X) + (1 + 1)·X at step 0.
    assert all(torch.equal(m.residual_scale.detach(), torch.ones(2)) for m in modules)
    batch = inputs(family)
    reference = output(twin, batch)
    for layer in describe(twin).layers:
        attach_parallel_ffn(layer, _Residual(2.0))
    assert torch.equal(output(model, batch), output(twin, batch))
    assert not torch.equal(output(model, batch), reference)


class _Residual(BlockComponent):
    """The manual KronA^B_res at init: s_res·X."""

    def __init__(self, s: float):
        super().__init__(0, 0)
        self.s = s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s * x


@pytest.mark.parametrize("n_bias", [0, 1, 2])
def test_krona_b_module_is_the_manual_formula(n_bias):
    torch.manual_seed(0)
    d, s = 32, 4.0
    res = nn.Parameter(torch.tensor([0.7, -0.2]))
    module = KronAB(d, (4, 8), (8, 4), n_modules=2, scale=s, n_bias=n_bias, residual=res).double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    res = module.residual_scale
    x = torch.randn(3, 5, d, dtype=torch.float64)
    expected = torch.zeros(3, 5, d, dtype=torch.float64)
    for k in range(2):
        A, B = module.A[k], module.B[k]
        if n_bias == 2:  # (A_kᵀ X + C_k) B_k, X the (m1, m2) reshape of x
            X = x.reshape(3, 5, 4, 8)
            yk = ((A.t() @ X + module.mid_bias[k]) @ B).reshape(3, 5, d)
        else:
            yk = x @ torch.kron(A, B)
        expected += yk + (module.bias[k] if n_bias else 0)
    expected = s * expected + res.sum() * x
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    sizes = {"A": 2 * 32, "B": 2 * 32, "bias": 2 * d * (n_bias >= 1), "mid_bias": 2 * 8 * 8 * (n_bias == 2)}  # C_k: (n1, m2)
    assert {n: p.numel() for n, p in module.named_parameters() if n != "residual_scale"} == {
        k: v for k, v in sizes.items() if v
    }
    # delta_weight: the linear part s·Σ_k A_k ⊗ B_k
    torch.testing.assert_close(module.delta_weight(), s * (torch.kron(module.A[0], module.B[0]) +
                                                           torch.kron(module.A[1], module.B[1])))


@pytest.mark.parametrize(("sharing", "per_layer"), [("module", 2), ("ffn", 1), ("model", None)])
def test_s_res_sharing_and_gradients(sharing, per_layer):
    model = tiny_model("gpt2")
    adapted = krona_b(model, f"method.components.krona_b_res.residual_sharing={sharing}", method="krona_b_res")
    modules = of_type(adapted, KronAB)
    scales = {id(m.residual_scale) for m in modules}
    n_res = 1 if per_layer is None else per_layer * len(modules)
    assert len(scales) == (1 if per_layer is None else len(modules))
    assert all(m.residual_scale.numel() == (per_layer or 1) for m in modules)
    own = len(modules) * (2 * (32 + 32) + 2 * 32)  # A, B, one output bias per module
    assert adapted.count().trainable == adapted.count().stored == own + n_res
    batch = inputs("gpt2")
    model.train()
    logits = model(**batch).logits
    logits.float().pow(2).mean().backward()
    for m in modules:
        assert m.residual_scale.grad is not None and m.residual_scale.grad.abs().sum() > 0
        assert m.B.grad.abs().sum() > 0  # the zero factor learns first (A's gradient is 0 while B = 0)
    # Shared: the one scalar appears once in the adapter state.
    state = adapted.adapter_state_dict()
    assert sum("residual_scale" in k for k in state) == (1 if per_layer is None else len(modules))


# ---------------------------------------------------------------- counts (docs/deviations.md)


@pytest.mark.parametrize(
    ("args", "trainable"),
    [
        # 72 × 1,536 on W_q, W_v of all 36 attention modules, + T5's 62 LayerNorms (47,616).
        (["model=t5_base", "method=krona", "budget=t5_glue"], 158_208),
        (["model=t5_base", "method=krona", "budget=t5_glue", "budget.krona.train_layernorm=false"], 110_592),
        (["model=t5_base", "method=krona", "budget=t5_glue", "budget.krona.attention=self",
          "budget.krona.train_layernorm=false"], 73_728),
        # 24 FFNs × 2 modules × (768 + 768 + a 768 bias).
        (["model=t5_base", "method=krona_b", "budget=t5_glue"], 158_208),
        (["model=t5_base", "method=krona_b", "budget=t5_glue", "budget.krona_b.train_layernorm=false"], 110_592),
        (["model=t5_base", "method=krona_b_res", "budget=t5_glue"], 158_208 + 48),  # + one s_res per module
        # GPT-2 small, the T5 shapes: 24 × 1,536 (its LayerNorms: + 25 × 1,536 with their biases).
        (["model=gpt2", "method=krona", "budget=t5_glue", "budget.krona.train_layernorm=false"], 36_864),
        (["model=gpt2", "method=krona", "budget=t5_glue"], 36_864 + 38_400),
    ],
)
def test_krona_counts(args, trainable, capsys):
    record = count_main(args)
    assert record["trainable"] == record["stored"] == trainable
    if trainable == 158_208:
        assert record["total"] == 222_903_552 and record["trainable_pct"] == 0.071
    capsys.readouterr()


def test_krona_cannot_meet_a_budget_without_its_sizes(capsys):
    with pytest.raises(SystemExit):
        count_main(["model=gpt2", "method=krona", "budget=small"])
    assert "kpeft: error: method 'krona' cannot meet budget 'small': it gives no krona size; budgets that do: nlu, t5_glue" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------- training


BACKBONE_TASKS = {"tiny_gpt2": "demo_reverse", "tiny_bert": "demo_sentiment", "tiny_t5": "demo_reverse_s2s",
                  "tiny_llama": "demo_reverse"}


@pytest.mark.parametrize("model", list(BACKBONE_TASKS))
@pytest.mark.parametrize(("method", "section"), [("krona", "krona"), ("krona_b", "krona_b"), ("krona_b_res", "krona_b")])
def test_every_variant_trains_on_every_backbone_family_at_its_own_budget(model, method, section, make_cfg):
    """GPT-2, BERT/RoBERTa, T5, Llama. No budget= given: the KronA family runs at t5_glue (shapes fitted to the tiny width; B
    derived per matrix for Llama's narrower GQA value projection). The record is complete and
    counted, and the zero-initialised factor has moved."""
    from safetensors.torch import load_file

    from kpeft.count import count_parameters

    b_shape = "null" if model == "tiny_llama" and method == "krona" else TINY[1]
    cfg = make_cfg(f"model={model}", f"task={BACKBONE_TASKS[model]}", f"method={method}", "train.epochs=1",
                   f"budget.{section}.a_shape={TINY[0]}", f"budget.{section}.b_shape={b_shape}", "seed=3")
    assert cfg.budget.name == "t5_glue"
    record = run(cfg)
    assert record["status"] == "complete" and math.isfinite(record["metrics"]["test"]["loss"])
    counts = count_parameters(cfg)
    assert record["params"]["trainable"] == counts.trainable > 0
    state = load_file(str(Path(cfg.run_dir) / "checkpoints" / "best" / "adapter.safetensors"))
    factors_b = [v for k, v in state.items() if k.endswith(".B")]
    assert factors_b and all(v.abs().sum() > 0 for v in factors_b)  # B starts at zero; it trained


@pytest.mark.parametrize(
    ("method", "section"), [("krona", "krona"), ("krona_b", "krona_b"), ("krona_b_res", "krona_b")]
)
def test_a_short_training_run_completes(method, section, make_cfg):
    cfg = make_cfg(
        "model=tiny_t5", "task=demo_reverse_s2s", f"method={method}", "budget=t5_glue",
        f"budget.{section}.a_shape={TINY[0]}", f"budget.{section}.b_shape={TINY[1]}", "train.epochs=1",
    )
    record = run(cfg)
    assert record["status"] == "complete"
    assert math.isfinite(record["metrics"]["test"]["loss"])
    assert record["params"]["trainable"] > 0
