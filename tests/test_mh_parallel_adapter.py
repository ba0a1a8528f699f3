"""Multi-head parallel adapter (He et al. 2022, Table 1 "MH PA"): the batched Δ equals a per-head
loop; on all four families the adapted model equals the frozen model with a naively computed
per-head Δ added to W_o's input (an independent formulation); init; gradients; batched greedy
decoding; adapter state; counts by hand and from the budgets. The generic checks (zero W_up = the
frozen model, save/load, cache, padding, gradients) run on all four families in tests/test_matrix.py."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from helpers import (
    check_right_padding_is_ignored,
    inputs,
    method_cfg,
    output,
    randomise,
)
from helpers import tiny_model as _tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from kpeft.backbones import describe
from kpeft.count import main as count_main
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.mh_adapter import MultiHeadParallelAdapter, mh_adapter_params
from kpeft.training.decode import greedy_decode

FOUR = ["gpt2", "roberta_cls", "t5", "llama"]


@functools.cache
def _cached_model(family: str) -> torch.nn.Module:
    return _tiny_model(family)


def tiny_model(family: str) -> torch.nn.Module:
    """A fresh copy of the tiny `family` model (built once per test session)."""
    return copy.deepcopy(_cached_model(family))


@functools.cache
def mh_cfg(*overrides: str, budget: str = "small"):
    """The resolved method config (composed once per override set)."""
    return method_cfg("mh_parallel_adapter", *overrides, budget=budget)


def adapt(family: str, *overrides: str, budget: str = "small", scale: float | None = 0.3) -> AdaptedModel:
    model = tiny_model(family).double()
    adapted = apply_method(model, describe(model), mh_cfg(*overrides, budget=budget))
    if scale is not None:
        randomise(adapted, scale=scale)
    return adapted


def adapters(adapted: AdaptedModel) -> list[MultiHeadParallelAdapter]:
    return [c for c in adapted.all_components() if isinstance(c, MultiHeadParallelAdapter)]


# ---------------------------------------------------------------- batched = per-head loop


def naive_delta(adapter: MultiHeadParallelAdapter, u: torch.Tensor) -> torch.Tensor:
    """One head at a time, with plain 2-D matmuls: s·(relu(u_h W_down^(h) + b_d) W_up^(h) + b_u)."""
    heads = []
    for h in range(adapter.num_heads):
        uh = u[:, h if u.shape[1] > 1 else 0]  # (B, n, d_in): hidden input is shared by the heads
        a = uh @ adapter.down[h]
        if adapter.down_bias is not None:
            a = a + adapter.down_bias[h, 0]
        y = torch.relu(a) @ adapter.up[h]
        if adapter.up_bias is not None:
            y = y + adapter.up_bias[h, 0]
        heads.append(adapter.scaling * y)
    return torch.stack(heads, 1)


@pytest.mark.parametrize("input_kind", ["query", "hidden"])
def test_batched_delta_equals_a_per_head_loop(input_kind):
    torch.manual_seed(0)
    a = MultiHeadParallelAdapter(4, 8, 32, 3, input=input_kind, bias=True, scale=2.5, init="hf_normal",
                                 init_std=0.3, dtype=torch.float64)
    with torch.no_grad():
        a.down_bias.normal_()
        a.up_bias.normal_()
    u = torch.randn(2, 4 if input_kind == "query" else 1, 5, 8 if input_kind == "query" else 32, dtype=torch.float64)
    torch.testing.assert_close(a.delta(u), naive_delta(a, u), rtol=1e-12, atol=1e-12)


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_the_number_of_ops_does_not_depend_on_the_head_count():
    counts = []
    for heads in (2, 16):
        a = MultiHeadParallelAdapter(heads, 8, 8 * heads, 4, bias=True)
        with _OpCount() as mode:
            a.delta(torch.randn(2, heads, 5, 8))
        counts.append(mode.n)
    assert counts[0] == counts[1]


# ---------------------------------------------------------------- the model against a naive reference


def reference_with_naive_delta(frozen: torch.nn.Module, adapted: AdaptedModel, attention: str = "self"):
    """`frozen` (a copy of the backbone before the method) with hooks that add the concatenated
    per-head Δ, computed head by head from the captured attention input, to W_o's input."""
    anatomy = describe(frozen)
    pairs = list(zip(anatomy.attentions(attention), adapters(adapted), strict=True))
    for (_, att), adapter in pairs:
        seen = {}

        def grab(module, args, kwargs, _seen=seen):
            _seen["x"] = args[0] if args else kwargs["hidden_states"]

        def add(module, args, _seen=seen, _att=att, _a=adapter):
            x = _seen.pop("x")  # (B, n, d)
            if _a.ln is not None:
                x = _a.ln(x)
            if _a.input == "hidden":
                u = x[:, None]
            else:  # head h's frozen query: x W_q[:, c_h] + b_q[c_h], before RoPE
                w, b = _att.q.weight(), _att.q.bias()
                p = _a.head_dim
                u = torch.stack([x @ w[:, h * p:(h + 1) * p] + (0 if b is None else b[h * p:(h + 1) * p])
                                 for h in range(_a.num_heads)], 1)
            delta = naive_delta(_a, u)  # (B, H, n, p)
            return (args[0] + delta.transpose(1, 2).reshape(args[0].shape), *args[1:])

        att.module.register_forward_pre_hook(grab, with_kwargs=True)
        getattr(att.o.parent, att.o.attr).register_forward_pre_hook(add)
    return frozen


@pytest.mark.parametrize(("family", "options"), [
    *((f, ()) for f in FOUR),
    *((f, ("input=hidden", "layernorm=true", "bias=true", "scale=3")) for f in ("gpt2", "llama")),
    # the official code's LN before the frozen W_q (GPT-2: a column block of the fused c_attn)
    *((f, ("layernorm=true", "bias=true")) for f in ("gpt2", "roberta_cls")),
])
def test_adapted_model_equals_frozen_model_plus_naive_per_head_delta_before_w_o(family, options):
    model = tiny_model(family).double()
    frozen = copy.deepcopy(model)
    overrides = [f"method.components.mh_adapter.{o}" for o in options]
    adapted = apply_method(model, describe(model), mh_cfg(*overrides))
    randomise(adapted, scale=0.3)
    batch = inputs(family)
    plain = output(frozen, batch)
    want = output(reference_with_naive_delta(frozen, adapted), batch)
    got = output(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - plain).abs().max() > 1e-3 * plain.abs().max()  # the Δ is not negligible


def test_t5_cross_attention_is_configurable():
    model = tiny_model("t5").double()
    frozen = copy.deepcopy(model)
    adapted = apply_method(model, describe(model), mh_cfg("method.components.mh_adapter.attention=all"))
    assert len(adapters(adapted)) == 6  # 2 encoder self + 2 decoder self + 2 decoder cross
    randomise(adapted, scale=0.3)
    batch = inputs("t5")
    want = output(reference_with_naive_delta(frozen, adapted, attention="all"), batch)
    torch.testing.assert_close(output(model, batch), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FOUR)
def test_only_the_up_projection_starts_at_zero_and_down_is_kaiming_uniform(family):
    # (that the model then gives the frozen outputs is checked in tests/test_matrix.py)
    model = tiny_model(family)
    comps = adapters(apply_method(model, describe(model), mh_cfg()))
    assert all(torch.count_nonzero(c.up) == 0 and torch.count_nonzero(c.down) > 0 for c in comps)
    bound = 1 / comps[0].head_dim ** 0.5  # Kaiming-uniform (a=√5) over the per-head input width p
    assert all(c.down.abs().max() <= bound for c in comps)


def test_gradients_reach_both_projections_and_nothing_else_trains():
    adapted = adapt("gpt2", scale=None)
    model = adapted.model.train()
    batch = inputs("gpt2")
    model(**batch).logits.pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in adapted.trainable_parameters()} and all("kpeft_site" in n for n in trained)
    for c in adapters(adapted):  # W_up = 0: dL/dW_up ≠ 0, dL/dW_down = 0 until W_up moves
        assert c.up.grad.abs().max() > 0 and c.down.grad.abs().max() == 0
    with torch.no_grad():
        for c in adapters(adapted):
            c.up.normal_()
            c.up.grad = c.down.grad = None
    model(**batch).logits.pow(2).mean().backward()
    assert all(c.down.grad.abs().max() > 0 for c in adapters(adapted))


# ---------------------------------------------------------------- decoding, state


def naive_greedy(model, prompt, steps):
    ids, out = list(prompt), []
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_batched_cached_decoding_equals_unbatched_uncached():
    model = adapt("gpt2").model  # (Llama: HF generate below)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (k,), generator=g).tolist() for k in (3, 8, 1, 5)]
    want = [naive_greedy(model, p, 6) for p in prompts]
    assert greedy_decode(model, prompts, max_new_tokens=6, pad_id=0, batch_size=4) == want


def test_extra_right_padding_leaves_real_token_outputs_unchanged():
    check_right_padding_is_ignored(adapt("t5", "method.components.mh_adapter.attention=all").model, "t5")


def test_adapter_state_round_trips_and_a_deep_copy_is_independent():
    adapted = adapt("llama", "method.components.mh_adapter.layernorm=true")
    batch = inputs("llama")
    state = adapted.adapter_state_dict()
    assert state and all("kpeft_site" in n for n in state)
    expected = output(adapted.model, batch)
    twin = copy.deepcopy(adapted.model)
    randomise(adapted, seed=9)
    assert not torch.equal(output(adapted.model, batch), expected)
    assert torch.equal(output(twin, batch), expected)  # the copy's hooks feed the copy's adapters
    adapted.load_adapter_state_dict(state)
    assert torch.equal(output(adapted.model, batch), expected)
    assert not adapted.mergeable


# ---------------------------------------------------------------- counts


def test_per_module_formula_by_hand():
    # query input: H·(p·r + r·p) = 2·d·r; GPT-2 small r = 9: 2·768·9 = 13,824 per layer.
    assert mh_adapter_params(12, 64, 768, 9) == 12 * (64 * 9 + 9 * 64) == 13_824
    assert mh_adapter_params(12, 64, 768, 9, bias=True) == 13_824 + 12 * (9 + 64)
    assert mh_adapter_params(12, 64, 768, 9, input="hidden", layernorm=True) == 12 * (768 * 9 + 9 * 64) + 2 * 768
    # tiny GPT-2 (2 layers, 4 heads of 8, d 32), small budget r = 9: 2 × 2·32·9 = 1,152; with
    # bias, LN and the hidden input: 2 × (4·(32·9 + 9·8) + 4·(9 + 8) + 64) = 3,144.
    assert adapt("gpt2", scale=None).count().trainable == 1_152
    big = adapt("gpt2", *(f"method.components.mh_adapter.{o}" for o in ("bias=true", "layernorm=true", "input=hidden")),
                scale=None)
    assert big.count().trainable == big.count().stored == 3_144


@pytest.mark.parametrize(("args", "trainable", "line"), [
    (["model=gpt2", "method=mh_parallel_adapter", "budget=small"], 165_888, "trainable 165,888 (0.13%)"),
    (["model=gpt2", "method=mh_parallel_adapter", "budget=intermediate"], 2_009_088, "trainable 2,009,088 (1.61%)"),
    (["model=roberta_base", "method=mh_parallel_adapter", "budget=nlu"], 608_256, "trainable 608,256 (0.49%)"),
    (["model=t5_base", "method=mh_parallel_adapter", "budget=t5_glue"], 158_208, "trainable 158,208 (0.07%)"),
])
def test_counts_from_the_budgets(args, trainable, line, capsys):
    # 12 layers × 2·768·r (r = 9, 109, 33); T5-base: 36 attention modules × 2·768·2 + 62 LayerNorms × 768.
    record = count_main(args)
    assert record["trainable"] == record["stored"] == trainable
    assert line in capsys.readouterr().out.splitlines()


def test_a_short_training_run_completes(tmp_path):
    from kpeft.compose import compose
    from kpeft.train import run

    cfg = compose(["model=tiny_llama", "task=demo_reverse", "method=mh_parallel_adapter", "budget=small",
                   "train.epochs=1", f"output_root={tmp_path}", "train.progress=false",
                   "task.options.n_train=64", "task.options.n_val=16", "task.options.n_test=16"])
    record = run(cfg)
    assert record["status"] == "complete" and record["training"]["steps"] == 2
    assert record["params"]["trainable"] == record["params"]["stored"] == 2 * 2 * 32 * 9  # 2 layers × 2·d·r
