"""SAID / DID (Aghajanyan et al. 2021): the Fastfood projection against an explicit dense
construction, the reparameterised model against explicitly perturbed weights, gradients, the
once-per-forward projection, merging, counts, adapter round trips and a short training run."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import inputs, method_cfg, output, tiny_model
from omegaconf import OmegaConf

from kpeft.backbones import describe
from kpeft.compose import compose
from kpeft.count import count_parameters
from kpeft.errors import KpeftError
from kpeft.methods import apply_method
from kpeft.methods.said import SAID, Fastfood, fwht
from kpeft.training.checkpoint import load_adapter, save_adapter


def said(model, *overrides: str, d: int = 16):
    mcfg = method_cfg("said", f"method.components.said.d={d}", *[f"method.components.said.{o}" for o in overrides])
    adapted = apply_method(model, describe(model), mcfg)
    return adapted, adapted.components["said"][0]


def dense_fastfood(ff: Fastfood) -> np.ndarray:
    """P as a D×d matrix from explicit H, G_j, Π_j, B_j matrices (float64)."""
    signs, perm, gauss = (t.double().numpy() if t.is_floating_point() else t.numpy() for t in ff.generate())
    m = ff.block
    H = scipy.linalg.hadamard(m).astype(np.float64)
    perm = perm.reshape(ff.n_blocks, m) - np.arange(ff.n_blocks)[:, None] * m
    blocks = []
    for j in range(ff.n_blocks):
        B = np.diag(signs[j].astype(np.float64))
        Pi = np.zeros((m, m))
        Pi[np.arange(m), perm[j]] = 1.0  # (Π y)_i = y_{π(i)}
        G = np.diag(gauss[j])  # G_j / (σ_j √D), σ_j = ‖G_j‖ (checked below)
        blocks.append(H @ G @ Pi @ H @ B)
    pad = np.eye(m)[:, : ff.d]  # zero-padding of x to d'
    return (np.vstack(blocks) @ pad)[: ff.D]


def randomise_said(comp: SAID, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        comp.theta_d.copy_(torch.randn(comp.theta_d.shape, generator=g))
        if comp.lambdas is not None:
            comp.lambdas.copy_(torch.rand(comp.lambdas.shape, generator=g) * 2 + 0.5)


# ---------------------------------------------------------------- Fastfood
@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_is_the_sylvester_hadamard_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    expected = x @ torch.from_numpy(scipy.linalg.hadamard(n)).double().T
    torch.testing.assert_close(fwht(x), expected, rtol=0, atol=1e-12)


def test_fwht_refuses_a_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(6))


@pytest.mark.parametrize(("d", "D"), [(5, 20), (8, 6), (3, 64), (16, 16)])
def test_fastfood_equals_the_dense_construction(d, D):
    ff = Fastfood(d, D, seed=7)
    assert ff.block == 1 << math.ceil(math.log2(d)) and ff.n_blocks == math.ceil(D / ff.block)
    _, _, gauss = ff.generate()
    torch.testing.assert_close(gauss.norm(dim=1) * math.sqrt(D), torch.ones(ff.n_blocks))  # 1/(σ_j √D)
    P = torch.from_numpy(dense_fastfood(ff)).float()
    x = torch.randn(d, requires_grad=True)
    y = ff(x)
    torch.testing.assert_close(y, P @ x.detach(), rtol=1e-5, atol=1e-6)
    w = torch.randn(D)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    torch.testing.assert_close(grad, P.T @ w, rtol=1e-5, atol=1e-6)  # backward = Pᵀ


def test_fastfood_preserves_norms_in_expectation():
    d, D = 50, 3000
    x = torch.randn(d)
    ratios = torch.stack([ff(x).norm() ** 2 / x.norm() ** 2 for ff in (Fastfood(d, D, s) for s in range(40))])
    assert abs(ratios.mean().item() - 1) < 0.03
    # columns: E‖P e_l‖² = 1 (each column of the dense matrix)
    cols = np.stack([np.linalg.norm(dense_fastfood(Fastfood(5, 200, s)), axis=0) ** 2 for s in range(30)])
    assert abs(cols.mean() - 1) < 0.03


def test_fastfood_is_reproducible_from_the_seed_only():
    x = torch.randn(12)
    torch.testing.assert_close(Fastfood(12, 100, 3)(x), Fastfood(12, 100, 3)(x), rtol=0, atol=0)
    assert not torch.allclose(Fastfood(12, 100, 3)(x), Fastfood(12, 100, 4)(x))


# ---------------------------------------------------------------- SAID on the four families
@pytest.mark.parametrize("family", ["gpt2", "roberta_cls", "t5", "llama"])
def test_said_starts_at_theta_zero_and_lambda_one(family):
    # (that it then gives the frozen model's outputs exactly is checked in tests/test_matrix.py)
    _, comp = said(tiny_model(family))
    assert comp.theta_d.abs().sum() == 0 and torch.equal(comp.lambdas, torch.ones(len(comp.pieces)))


def _explicit(frozen, comp: SAID) -> torch.nn.Module:
    """The frozen model with every perturbed tensor written in by hand: θ_0 + λ_i (P θ^d)_i,
    P the dense matrix."""
    ref = copy.deepcopy(frozen)
    delta = torch.from_numpy(dense_fastfood(comp.projection)).float() @ comp.theta_d.detach()
    with torch.no_grad():
        for i, piece in enumerate(comp.pieces):
            name = piece.name.split("[")[0]
            target = ref.get_parameter(name)
            if piece.region is not None:
                dim, start, stop = piece.region
                target = target.narrow(dim, start, stop - start)
            lam = comp.lambdas[i].item() if comp.lambdas is not None else 1.0
            target += lam * delta[piece.offset : piece.offset + target.numel()].view(target.shape)
    return ref


CASES = [("gpt2", ()), ("gpt2", ("targets=[q,v]",)), ("gpt2", ("targets=[o,ffn]", "biases=false")),
         ("roberta_cls", ()), ("t5", ()), ("llama", ("targets=[layers]", "structured=false"))]


@pytest.mark.parametrize(("family", "overrides"), CASES)
def test_said_equals_explicitly_perturbed_weights(family, overrides):
    model = tiny_model(family)
    frozen = copy.deepcopy(model)
    batch = inputs(family)
    adapted, comp = said(model, *overrides)
    randomise_said(comp)
    ref = _explicit(frozen, comp)
    out = output(model, batch)
    torch.testing.assert_close(out, output(ref, batch), rtol=1e-5, atol=1e-5)
    assert (out - output(frozen, batch)).abs().max() > 1e-3


def test_tied_and_fused_tensors_are_perturbed_once():
    model = tiny_model("gpt2")
    _, comp = said(model, "targets=[all,q]")
    names = [p.name for p in comp.pieces]
    assert len(names) == len(set(names)) == 28  # c_attn whole (all wins over its q block); wte once
    assert comp.D == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr() or torch.equal(
        model.lm_head.weight, model.transformer.wte.weight)
    _, comp = said(tiny_model("gpt2"), "targets=[q,v]", "biases=false")
    assert [p.region for p in comp.pieces] == [(1, 0, 32), (1, 64, 96)] * 2  # q, v column blocks per layer


def test_gradients_reach_theta_and_lambda_as_the_chain_rule_says():
    """dL/dλ_i = ⟨dL/dW_i, (Pθ)_i⟩ and dL/dθ = Pᵀ [λ_i dL/dW_i]_i, with dL/dW from the explicit model."""
    model = tiny_model("llama")
    frozen = copy.deepcopy(model)
    batch = inputs("llama")
    _, comp = said(model, d=12)
    randomise_said(comp, seed=2)
    weights = torch.randn(batch["input_ids"].shape + (256,), generator=torch.Generator().manual_seed(0))
    (model(**batch).logits * weights).sum().backward()
    ref = _explicit(frozen, comp)
    for p in ref.parameters():
        p.requires_grad_(True)
    (ref(**batch).logits * weights).sum().backward()
    P = torch.from_numpy(dense_fastfood(comp.projection)).float()
    delta = P @ comp.theta_d.detach()
    grads = torch.cat([ref.get_parameter(p.name).grad.flatten() for p in comp.pieces])
    lam = torch.repeat_interleave(comp.lambdas.detach(), torch.tensor([p.numel for p in comp.pieces]))
    expected_lambda = torch.stack([(ref.get_parameter(p.name).grad.flatten() * delta[p.offset:p.offset + p.numel]).sum()
                                   for p in comp.pieces])
    expected_theta = (P.double().T @ (lam * grads).double()).float()
    tol = {"rtol": 1e-4, "atol": 1e-5 * expected_theta.abs().max().item()}  # float32 sums over D terms
    torch.testing.assert_close(comp.lambdas.grad, expected_lambda, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp.theta_d.grad, expected_theta, **tol)
    assert comp.theta_d.grad.abs().min() > 0 and comp.lambdas.grad.abs().sum() > 0


def test_the_projection_runs_once_per_forward():
    model = tiny_model("gpt2")
    batch = inputs("gpt2")
    adapted, comp = said(model)
    opt = torch.optim.SGD([comp.theta_d, comp.lambdas], lr=0.1)
    for _ in range(3):  # training: one projection per forward, however many tensors read it
        before = comp.projections_computed
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        assert comp.projections_computed == before + 1
    before = comp.projections_computed
    output(model, batch), output(model, batch)  # no gradients, θ unchanged: reused
    assert comp.projections_computed == before + 1
    with torch.no_grad():
        comp.theta_d.add_(1.0)
    output(model, batch)
    assert comp.projections_computed == before + 2  # θ changed: formed again


def test_merge_bakes_the_update_and_unmerge_restores_it():
    model = tiny_model("t5")
    batch = inputs("t5")
    _, comp = said(model)
    randomise_said(comp)
    unmerged = output(model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    comp.merge()
    calls = comp.projections_computed
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)
    assert comp.projections_computed == calls  # merged: no projection runs
    comp.unmerge()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_cached_generation_uses_the_perturbed_weights_with_one_projection(family):
    """HF generate (KV cache; T5 calls its encoder directly) gives the tokens of the merged model,
    and the projection is formed once for the whole generation."""
    model = tiny_model(family)
    _, comp = said(model)
    randomise_said(comp)
    model.generation_config.pad_token_id = 0
    ids = inputs(family)["input_ids"]
    kw = {"max_new_tokens": 6, "do_sample": False}
    before = comp.projections_computed
    with torch.no_grad():
        unmerged = model.generate(input_ids=ids, **kw)
        assert comp.projections_computed == before + 1
        comp.merge()
        merged = model.generate(input_ids=ids, **kw)
    assert torch.equal(unmerged, merged)


def test_a_deep_copy_has_its_own_theta():
    model = tiny_model("gpt2")
    batch = inputs("gpt2")
    _, comp = said(model)
    twin = copy.deepcopy(model)
    randomise_said(comp)
    assert twin.kpeft_said.theta_d.abs().sum() == 0
    assert not torch.allclose(output(model, batch), output(twin, batch))


# ---------------------------------------------------------------- counts
def test_counts_on_a_tiny_model():
    a, _ = said(tiny_model("gpt2"), d=100)
    assert (a.count().trainable, a.count().stored) == (100 + 28, 100 + 28 + 1)  # + the seed
    a, _ = said(tiny_model("gpt2"), "structured=false", d=100)
    assert (a.count().trainable, a.count().stored) == (100, 101)
    a, comp = said(tiny_model("gpt2"), "targets=[q,v]", d=100)  # 2 layers × (q, v) × (weight, bias)
    assert a.count().trainable == 108 and comp.D == 2 * 2 * (32 * 32 + 32)


@pytest.mark.parametrize(("model", "budget", "trainable"), [
    ("gpt2", "tiny", 92_160), ("gpt2", "small", 165_888), ("gpt2", "intermediate", 2_009_088),
    ("roberta_base", "nlu", 608_256), ("t5_base", "t5_glue", 158_208),
])
def test_budget_counts_match_the_budget(model, budget, trainable):
    cfg = compose([f"model={model}", "method=said", f"budget={budget}"])
    count = count_parameters(cfg)
    assert (count.trainable, count.stored) == (trainable, trainable + 1)


def test_unknown_targets_are_a_one_line_error():
    with pytest.raises(KpeftError, match="valid entries are all, layers"):
        said(tiny_model("gpt2"), "targets=[qq]")


# ---------------------------------------------------------------- adapter state and training
def test_adapter_state_round_trips(tmp_path):
    cfg = compose(["model=tiny_roberta", "method=said", "budget=small", "method.components.said.d=32",
                   "task=demo_sentiment", "seed=5"])
    OmegaConf.resolve(cfg)
    model = tiny_model("roberta_cls")
    adapted = apply_method(model, describe(model), cfg.method)
    comp = adapted.components["said"][0]
    assert comp.projection.seed == 5  # the run's seed regenerates P
    randomise_said(comp)
    state = adapted.adapter_state_dict()
    assert {"kpeft_said.theta_d", "kpeft_said.lambdas"} <= set(state)
    assert state["kpeft_said.theta_d"].numel() == 32
    save_adapter(tmp_path / "best", adapted, cfg)
    batch = inputs("roberta_cls")
    fresh = tiny_model("roberta_cls")
    again = apply_method(fresh, describe(fresh), cfg.method)
    assert not torch.allclose(output(fresh, batch), output(model, batch))
    load_adapter(tmp_path / "best", again)
    torch.testing.assert_close(output(fresh, batch), output(model, batch), rtol=0, atol=0)


def test_a_short_training_run_lowers_the_loss(tmp_path):
    from kpeft.train import run

    cfg = compose(["model=tiny_gpt2", "task=demo_reverse", "method=said", "budget=small", "budget.said.d=256",
                   "task.options.n_train=128", "task.options.n_val=32", "task.options.n_test=64",
                   "train.batch_size=16", "train.epochs=2", "train.lr=0.05", "train.eval_before_training=true",
                   f"output_root={tmp_path}", "train.progress=false"])
    record = run(cfg)
    assert record["status"] == "complete"
    assert record["params"]["trainable"] == 256 + 28
    assert record["metrics"]["test"]["loss"] < 0.92 * record["metrics"]["untrained"]["loss"]  # 5.53 → 4.84


def test_the_random_projection_counts_as_resident_memory():
    """kpeft.bench charges SAID for its regenerated Fastfood tensors (signs int8, permutation
    indices, Gaussian diagonal), which are neither parameters nor buffers."""
    from kpeft.bench.timing import resident_bytes

    model = tiny_model("gpt2")
    _, comp = said(model)
    assert comp.resident_tensors() == []  # generated lazily, at the first projection
    without = resident_bytes(model)
    output(model, inputs("gpt2"))
    signs, perm, gauss = comp.resident_tensors()
    n = comp.projection.n_blocks * comp.projection.block
    assert (signs.numel(), perm.numel(), gauss.numel()) == (n, n, n)
    assert resident_bytes(model) - without == n * (1 + perm.element_size() + 4)


def test_split_pieces_give_the_same_gradients_as_slices():
    """The pieces are one `split` of P(θ^d) (one concatenation in backward, not a zero-filled
    D-vector per slice): gradients equal those through per-piece slices of the same vector."""
    model = tiny_model("gpt2")
    batch = inputs("gpt2")
    _, comp = said(model)
    randomise_said(comp)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    split_grad = comp.theta_d.grad.clone()
    delta = comp.project()
    sliced = [delta[p.offset:p.offset + p.numel] for p in comp.pieces]
    weights = torch.randn(comp.D)
    sum((s * weights[p.offset:p.offset + p.numel]).sum() for s, p in zip(sliced, comp.pieces)).backward()
    via_slices = comp.theta_d.grad - split_grad
    comp.theta_d.grad = None
    parts = comp.split(comp.project())
    sum((s * weights[p.offset:p.offset + p.numel]).sum() for s, p in zip(parts, comp.pieces)).backward()
    torch.testing.assert_close(comp.theta_d.grad, via_slices)
    assert [t.numel() for t in parts] == [p.numel for p in comp.pieces] and sum(comp._sizes) == comp.D


def test_decoding_forms_each_perturbed_weight_once_per_call():
    """greedy_decode runs under parametrize.cached(): θ_0 + λ_i P(θ^d)_i is formed once per
    parametrized tensor per call, not once per generated token, and the tokens equal those of the
    merged model (the update baked into the weights)."""
    from torch.nn.utils import parametrize

    from kpeft.methods.said import _Shifted
    from kpeft.training.decode import greedy_decode

    model = tiny_model("gpt2")
    _, comp = said(model)
    randomise_said(comp)
    model.eval()
    calls = {"n": 0}
    original = _Shifted.forward

    def counting(self, w):
        calls["n"] += 1
        return original(self, w)

    prompts = [[5, 6, 7], [8, 9]]
    _Shifted.forward = counting
    try:
        tokens = greedy_decode(model, prompts, max_new_tokens=6, pad_id=0)
    finally:
        _Shifted.forward = original
    parametrized = sum(len(m.parametrizations) for m in model.modules() if parametrize.is_parametrized(m))
    assert 0 < calls["n"] <= parametrized  # at most once each (the tied head shares wte's)
    assert all(len(t) == 6 for t in tokens)
    comp.merge()
    assert greedy_decode(model, prompts, max_new_tokens=6, pad_id=0) == tokens
