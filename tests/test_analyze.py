"""``python -m kpeft.analyze``: LoRA's subspace similarity (Eq. 4) and amplification factor
(Table 7) against hand-computed values, per-head norms against a naive loop over a ΔW read off
the forward pass, and the CLI on run directories written with the checkpoint API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import randomise
from omegaconf import OmegaConf
from safetensors.torch import load_file

from kpeft.analysis.subspace import amplification, head_norms, right_singular_basis, subspace_similarity
from kpeft.analyze import main
from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.compose import compose
from kpeft.methods import apply_method
from kpeft.methods.base import AdaptedProjection
from kpeft.training.checkpoint import save_adapter


# ---------------------------------------------------------------- subspace similarity (Eq. 4)
def test_phi_of_an_adapter_with_itself_is_one():
    a = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    u = right_singular_basis(a)
    phi = subspace_similarity(u, u)
    assert phi.shape == (6, 6)
    torch.testing.assert_close(phi, torch.ones(6, 6, dtype=torch.float64))  # nested subspaces: φ = 1


def test_phi_of_orthogonal_subspaces_is_zero():
    g = torch.Generator().manual_seed(1)
    a1 = torch.cat([torch.randn(3, 5, generator=g), torch.zeros(3, 15)], 1)
    a2 = torch.cat([torch.zeros(4, 5), torch.randn(4, 15, generator=g)], 1)
    phi = subspace_similarity(right_singular_basis(a1), right_singular_basis(a2))
    torch.testing.assert_close(phi, torch.zeros(3, 4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_phi_by_hand():
    e = torch.eye(4, dtype=torch.float64)
    # U1 = [e0, e1], U2 = [e1, e2, e0]: U1ᵀU2 = [[0,0,1],[1,0,0]]
    phi = subspace_similarity(e[:, [0, 1]], e[:, [1, 2, 0]])
    expected = torch.tensor([[0, 0, 1], [1, 1 / 2, 1]], dtype=torch.float64)
    torch.testing.assert_close(phi, expected)
    # A1 = e0; A2's top direction (σ = 3) is cos t·e0 + sin t·e1, its second (σ = 1) e2: φ(1, j) = cos²t
    t = 0.3
    a2 = torch.tensor([[3 * math.cos(t), 3 * math.sin(t), 0, 0], [0, 0, 1, 0]], dtype=torch.float64)
    phi = subspace_similarity(right_singular_basis(e[:1]), right_singular_basis(a2))
    torch.testing.assert_close(phi.abs(), torch.full((1, 2), math.cos(t) ** 2, dtype=torch.float64))
    a2 = a2[[1, 0]] * torch.tensor([[3.0], [1 / 3]], dtype=torch.float64)  # now e2 is the top direction
    phi = subspace_similarity(right_singular_basis(e[:1]), right_singular_basis(a2))
    torch.testing.assert_close(phi, torch.tensor([[0.0, math.cos(t) ** 2]], dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- amplification (Table 7)
def _w_with_spectrum(sigma: list[float], d_in: int = 12, d_out: int = 10):
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    w = u[:, : len(sigma)] @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v[:, : len(sigma)].T
    return w, u, v


SIGMA = [9.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2]


def test_amplification_of_an_update_inside_w_top_subspace():
    w, u, v = _w_with_spectrum(SIGMA)
    a, b = 2.0, 0.5
    delta = a * torch.outer(u[:, 0], v[:, 0]) + b * torch.outer(u[:, 1], v[:, 1])  # rank 2, W's top-2 directions
    out = amplification(w, delta)
    assert (out["r"], out["rank"]) == (2, 2)
    assert out["delta_norm"] == pytest.approx(math.hypot(a, b))
    assert out["w_norm"] == pytest.approx(math.sqrt(sum(s * s for s in SIGMA)))
    assert out["proj_delta"] == pytest.approx(math.sqrt(81 + 25))  # ‖UᵀWV‖ = ‖diag(9, 5)‖
    assert out["proj_w"] == pytest.approx(math.sqrt(81 + 25))
    assert out["amplification"] == pytest.approx(math.hypot(a, b) / math.sqrt(106))
    assert 0 < out["proj_random"] < out["proj_w"]  # Ky Fan: W's own top-r directions maximise it


def test_amplification_of_an_update_in_w_weakest_direction_and_off_diagonal():
    w, u, v = _w_with_spectrum(SIGMA)
    out = amplification(w, 3.0 * torch.outer(u[:, 9], v[:, 9]))
    assert out["proj_delta"] == pytest.approx(0.2) and out["amplification"] == pytest.approx(15.0)
    out = amplification(w, torch.outer(u[:, 0], v[:, 1]))  # u1ᵀ W v2 = 0: W does not see it
    assert out["proj_delta"] == pytest.approx(0.0, abs=1e-12) and out["amplification"] > 1e10
    assert amplification(w, torch.zeros_like(w))["amplification"] is None


def test_head_norms_are_the_norms_of_each_head_block():
    d = torch.randn(12, 8, dtype=torch.float64)
    cols = torch.stack([d[:, 2 * h : 2 * h + 2].norm() for h in range(4)])
    rows = torch.stack([d[3 * h : 3 * h + 3].norm() for h in range(4)])
    torch.testing.assert_close(head_norms(d, 4, axis=1), cols)
    torch.testing.assert_close(head_norms(d, 4, axis=0), rows)


# ---------------------------------------------------------------- the CLI on run directories
def make_run(root, *overrides: str, seed: int = 1):
    """A run directory with checkpoints/best written by the checkpoint API (random adapter values)."""
    cfg = compose(["model=tiny_gpt2", "task=demo_reverse", f"seed={seed}", *overrides])
    OmegaConf.resolve(cfg)
    model = load_model(cfg.model, "causal_lm", seed=cfg.seed)
    adapted = apply_method(model, describe(model), cfg.method)
    randomise(adapted, seed=seed)
    save_adapter(root / "checkpoints" / "best", adapted, cfg)
    return adapted


def run_cli(capsys, *argv: str) -> dict:
    result = main(list(argv))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    return result


def _phi_naive(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    u1 = np.linalg.svd(a1)[2].T[:, : a1.shape[0]]
    u2 = np.linalg.svd(a2)[2].T[:, : a2.shape[0]]
    return np.array([[np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
                      for j in range(1, a2.shape[0] + 1)] for i in range(1, a1.shape[0] + 1)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "lora2", "method=lora", "budget=small", "method.components.lora.r=2", seed=1)
    make_run(root / "lora4", "method=lora", "budget=small", "method.components.lora.r=4", seed=2)
    kmix = make_run(root / "kmix", "method=kernel_mix_qvo", "budget=intermediate", seed=3)
    return root, kmix


def test_cli_similarity_round_trip(runs, capsys, tmp_path):
    root, _ = runs
    res = run_cli(capsys, "similarity", str(root / "lora2"), str(root / "lora4"), "--layer", "0", "--matrix", "q",
                  "--out", str(tmp_path))
    (pair,) = res["pairs"]
    assert (pair["layer"], pair["matrix"], pair["basis"], pair["r_a"], pair["r_b"]) == (0, "q", "A", 2, 4)
    key = "transformer.h.0.attn.c_attn.branches.0.lora_A"  # the q branch of layer 0
    a1 = load_file(str(root / "lora2/checkpoints/best/adapter.safetensors"))[key].double().numpy()
    a2 = load_file(str(root / "lora4/checkpoints/best/adapter.safetensors"))[key].double().numpy()
    np.testing.assert_allclose(np.array(pair["phi"]), _phi_naive(a1, a2), atol=1e-6)
    png = tmp_path / "similarity.png"
    assert res["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same = run_cli(capsys, "similarity", str(root / "lora4"), str(root / "lora4"), "--out", str(tmp_path))
    assert len(same["pairs"]) == 4  # q, v of two layers
    for p in same["pairs"]:
        np.testing.assert_allclose(np.diag(np.array(p["phi"])), 1.0, atol=1e-9)


def test_cli_amplification_round_trip(runs, capsys):
    root, _ = runs
    res = run_cli(capsys, "amplification", str(root / "lora2"), "--matrix", "v")
    assert [(m["layer"], m["matrix"], m["r"]) for m in res["matrices"]] == [(0, "v", 2), (1, "v", 2)]
    state = load_file(str(root / "lora2/checkpoints/best/adapter.safetensors"))
    a, b = state["transformer.h.1.attn.c_attn.branches.1.lora_A"], state["transformer.h.1.attn.c_attn.branches.1.lora_B"]
    delta = (32 / 2) * (b @ a).T.double()  # s = α/r
    model = load_model(compose(["model=tiny_gpt2"]).model, "causal_lm", seed=1)
    w = model.transformer.h[1].attn.c_attn.weight[:, 64:96].detach().double()  # the v block
    u, s, vh = np.linalg.svd(delta.numpy())
    proj = np.linalg.norm(u[:, :2].T @ w.numpy() @ vh[:2].T)
    m = res["matrices"][1]
    assert m["delta_norm"] == pytest.approx(float(np.linalg.norm(delta.numpy())), rel=1e-6)
    assert m["w_norm"] == pytest.approx(float(w.norm()), rel=1e-6)
    assert m["proj_delta"] == pytest.approx(float(proj), rel=1e-5)
    assert m["amplification"] == pytest.approx(m["delta_norm"] / float(proj), rel=1e-5)
    assert m["proj_w"] == pytest.approx(float(np.sqrt((np.linalg.svd(w.numpy())[1][:2] ** 2).sum())), rel=1e-6)


@torch.no_grad()
def _delta_from_forward(wrapper: AdaptedProjection, start: int, stop: int) -> torch.Tensor:
    """ΔW of a projection's column block read off its forward pass: (P(I) − P(0)) − (base(I) − base(0))."""
    eye = torch.eye(wrapper.base.weight.shape[0])
    zero = torch.zeros_like(eye[:1])
    full = wrapper(eye) - wrapper(zero)
    base = wrapper.base(eye) - wrapper.base(zero)
    return (full - base)[:, start:stop].double()


def test_cli_heads_equal_a_naive_per_head_loop(runs, capsys, tmp_path):
    root, kmix = runs
    kmix.model.eval()
    res = run_cli(capsys, "heads", str(root / "kmix"), "--out", str(tmp_path))
    assert {(m["layer"], m["matrix"]) for m in res["matrices"]} == {(i, t) for i in (0, 1) for t in "qvo"}
    totals = {}
    for m in res["matrices"]:
        attn = kmix.model.transformer.h[m["layer"]].attn
        if m["matrix"] == "o":
            delta = _delta_from_forward(attn.c_proj, 0, 32)
            blocks = [delta[8 * h : 8 * h + 8] for h in range(4)]  # W_o: rows of head h
        else:
            start = {"q": 0, "v": 64}[m["matrix"]]
            delta = _delta_from_forward(attn.c_attn, start, start + 32)
            blocks = [delta[:, 8 * h : 8 * h + 8] for h in range(4)]  # W_q, W_v: columns of head h
        naive = [float(blk.norm()) for blk in blocks]
        np.testing.assert_allclose(m["head_norms"], naive, rtol=1e-5)
        assert m["norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert sum(m["head_share"]) == pytest.approx(1.0)
        wise = {"q": "KernelWise", "v": "KernelWiseLite", "o": "KernelWiseOut"}[m["matrix"]]  # Q full, V lite
        assert set(m["branch_norms"]) == {"LoRA", wise}
        assert len(m["head_amplification"]) == 4
        totals[m["matrix"]] = totals.get(m["matrix"], 0.0) + float(delta.norm()) ** 2
    overall = sum(totals.values())
    for name, share in res["matrix_share"].items():
        assert share == pytest.approx(totals[name] / overall, rel=1e-5)
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(runs, capsys, tmp_path):
    root, _ = runs
    with pytest.raises(SystemExit) as info:
        main(["amplification", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kpeft: error: ") and "holds no saved adapter" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["similarity", str(root / "kmix"), str(root / "kmix"), "--basis", "A"])
    assert "--basis delta" in capsys.readouterr().err
