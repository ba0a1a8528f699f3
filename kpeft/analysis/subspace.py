"""The LoRA paper's analyses of weight updates (Hu et al. 2021, §7), as plain tensor functions.

Row convention throughout (``Y = X W``, ``W, ΔW ∈ R^{d_in×d_out}``): the paper's column-convention
``ΔW = U Σ Vᵀ`` is our ``ΔWᵀ``, so its right-singular (input-side) directions are our left ones.

* **Subspace similarity** (§7.2, Eq. 4): ``φ(A1, A2, i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j)`` over the
  top-i / top-j right-singular vectors of two adapters' ``A`` matrices (1 = one subspace contains
  the other, 0 = orthogonal).
* **Amplification** (§7.3, Table 7): project W onto ΔW's r-dimensional subspace,
  ``‖Uᵀ W V‖_F`` with U, V ΔW's top-r singular vectors (input and output side); the factor is
  ``‖ΔW‖_F / ‖Uᵀ W V‖_F``. Controls: the same projection with W's own top-r singular vectors
  (``= √(σ_1² + … + σ_r²)``) and with those of a random Gaussian matrix of W's shape.
"""

from __future__ import annotations

import math

import torch


def right_singular_basis(a: torch.Tensor) -> torch.Tensor:
    """Right-singular vectors of ``a`` (r × d) as columns, by decreasing singular value: (d, rank)."""
    _, s, vh = torch.linalg.svd(a.detach().double(), full_matrices=False)
    return vh[: numerical_rank(s, a.shape, a.dtype)].T


def input_basis(delta: torch.Tensor) -> torch.Tensor:
    """The input-side singular vectors of a row-convention ``ΔW`` (d_in × d_out): (d_in, rank)."""
    return right_singular_basis(delta.detach().T)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> int:
    """Singular values above ``σ_max · max(shape) · eps`` (``torch.linalg.matrix_rank``'s default),
    eps of the precision the matrix was computed in (a float32 ΔW is not full rank in float64)."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    tol = s[0] * max(shape) * torch.finfo(dtype).eps
    return int((s > tol).sum())


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``φ(i, j)`` for ``1 ≤ i ≤ r1``, ``1 ≤ j ≤ r2`` (entry ``[i-1, j-1]``) between orthonormal
    bases ``u1 (d, r1)`` and ``u2 (d, r2)`` whose columns are ordered by singular value (Eq. 4)."""
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(f"bases of different spaces: {tuple(u1.shape)} and {tuple(u2.shape)}")
    overlap = (u1.double().T @ u2.double()) ** 2  # (r1, r2)
    cumulative = overlap.cumsum(0).cumsum(1)  # ‖U1_iᵀ U2_j‖²_F for every (i, j)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def projection_norm(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> float:
    """``‖Uᵀ W V‖_F`` for row-convention ``W (d_in, d_out)``, ``U (d_in, r)``, ``V (d_out, r)``."""
    return float(torch.linalg.matrix_norm(u.T @ w.double() @ v))


def top_singular_pair(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-r left and right singular vectors of ``m`` (as columns)."""
    u, _, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
    return u[:, :r], vh[:r].T


def amplification(
    w: torch.Tensor, delta: torch.Tensor, r: int | None = None, seed: int = 0
) -> dict[str, float | int | None]:
    """LoRA Table 7 for one matrix: ``‖ΔW‖_F``, ``‖W‖_F``, ``‖Uᵀ W V‖_F`` with U, V from ΔW, from W
    and from a random Gaussian matrix, and the amplification factor ``‖ΔW‖_F / ‖Uᵀ W V‖_F``.

    ``r`` defaults to the numerical rank of ΔW (LoRA: its rank r)."""
    if w.shape != delta.shape:
        raise ValueError(f"W {tuple(w.shape)} and ΔW {tuple(delta.shape)} differ in shape")
    precision = delta.dtype
    w, delta = w.detach().double(), delta.detach().double()
    rank = numerical_rank(torch.linalg.svdvals(delta), tuple(delta.shape), precision)
    r = rank if r is None else min(int(r), min(delta.shape))
    out: dict[str, float | int | None] = {
        "r": r,
        "rank": rank,
        "delta_norm": float(torch.linalg.matrix_norm(delta)),
        "w_norm": float(torch.linalg.matrix_norm(w)),
    }
    if r == 0:
        return {**out, "proj_delta": 0.0, "proj_w": 0.0, "proj_random": 0.0, "amplification": None}
    out["proj_delta"] = projection_norm(w, *top_singular_pair(delta, r))
    out["proj_w"] = projection_norm(w, *top_singular_pair(w, r))
    gen = torch.Generator().manual_seed(seed)
    out["proj_random"] = projection_norm(w, *top_singular_pair(torch.randn(w.shape, generator=gen, dtype=torch.float64), r))
    out["amplification"] = out["delta_norm"] / out["proj_delta"] if out["proj_delta"] > 0 else math.inf
    return out


def head_blocks(delta: torch.Tensor, heads: int, axis: int) -> list[torch.Tensor]:
    """The per-head blocks of a row-convention matrix: columns ``c_h`` (``axis=1``: W_q, W_k, W_v)
    or rows ``c_h`` (``axis=0``: W_o), ``c_h = [h·p, (h+1)·p)``."""
    width = delta.shape[axis]
    if width % heads:
        raise ValueError(f"{width} is not divisible into {heads} heads")
    return list(torch.chunk(delta, heads, dim=axis))


def head_norms(delta: torch.Tensor, heads: int, axis: int) -> torch.Tensor:
    """``‖ΔW^(h)‖_F`` for every head, batched: ``(heads,)``."""
    blocks = delta.detach().double().unflatten(axis, (heads, delta.shape[axis] // heads))
    dims = (0, 2) if axis == 1 else (1, 2)  # sum over everything but the head axis
    return blocks.pow(2).sum(dim=dims).sqrt()
