"""Intrinsic-dimension fine-tuning: DID and SAID (Aghajanyan, Zettlemoyer & Gupta, ACL 2021, §3).

Every selected backbone tensor moves only inside a random d-dimensional subspace:

* DID (Eq. 1):  ``θ^D = θ^D_0 + P(θ^d)``, ``P: R^d → R^D`` fixed and random, only ``θ^d`` trains;
* SAID (Eq. 3): ``θ^D_i = θ^D_{0,i} + λ_i P(θ^d)_i`` per tensor i (one trained scalar λ_i per
  weight tensor: the "structure" of the model), ``λ`` initialised to 1, ``θ^d`` to 0 (so the model
  starts as the frozen one exactly).

**The projection** is the Fastfood transform (Le et al. 2013; the paper's Eq. 2, ``M = H G Π H B``),
never a dense D×d matrix. ``d`` is zero-padded to ``d' = 2^⌈log₂ d⌉`` and ``⌈D/d'⌉`` independent
blocks are stacked (truncated to D rows)::

    P = (1/√D) · [ (1/σ_j) H G_j Π_j H B_j ]_j,   σ_j = ‖G_j‖₂

with ``H`` the (unnormalised, Sylvester-order) Walsh–Hadamard matrix applied as a fast transform
(O(d' log d') per block, :func:`fwht`), ``G_j`` a Gaussian diagonal, ``Π_j`` a random permutation, ``B_j`` a random
±1 diagonal. Dividing by ``σ_j`` (the norm of the block's actual G, as Li et al.'s intrinsic-dimension
code does) and by √D gives ``E‖P x‖² = ‖x‖²`` and columns of norm ≈ 1, like a Gaussian projection
with N(0, 1/D) entries. B, Π and G are regenerated from ``seed`` on the CPU (so a checkpoint
reproduces P on any device): the adapter stores θ^d and λ, the config stores the seed.

**Efficiency.** Each selected tensor is reparameterised with ``torch.nn.utils.parametrize``:
reading ``module.weight`` gives ``θ_0 + λ_i P(θ^d)_i``. The projection itself runs once per model
forward: the parametrizations read a cached ``P(θ^d)`` that a pre-forward hook on the model
invalidates while training (a fresh graph per step) and that is reused across forwards while
``θ^d`` is unchanged without gradients (evaluation, cached decoding). :meth:`SAID.merge` bakes the
update into the frozen tensors (the parametrizations then return them unchanged);
:meth:`SAID.unmerge` takes it out again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from torch import nn
from torch.nn.utils import parametrize

from kpeft.errors import KpeftError
from kpeft.methods.base import Component
from kpeft.methods.parameters import LayerNormTuning
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class SAIDConfig(ComponentConfig):
    """Intrinsic-dimension fine-tuning: θ_i = θ_{0,i} + λ_i·P(θ^d)_i with a Fastfood projection P
    (SAID, Eq. 3; ``structured: false`` = DID, Eq. 1: no λ). Trains d + (number of λ) numbers."""

    kind: str = "said"
    d: int = MISSING  # dimension of θ^d (from the budget)
    # all | layers | attention | ffn | q | k | v | o | norms | embeddings (the union of the entries)
    targets: list[str] = field(default_factory=lambda: ["all"])
    biases: bool = True  # false: leave every bias out
    structured: bool = True  # SAID: one trained λ_i per perturbed tensor (init 1); false = DID
    seed: int = 0  # regenerates P (said.yaml: the run's seed)


@budget_sizes("said")
@dataclass
class SAIDSize:
    """SAID: the dimension d of θ^d (it trains d + one λ per perturbed tensor)."""

    d: int = MISSING

TARGETS = ("all", "layers", "attention", "ffn", "q", "k", "v", "o", "norms", "embeddings")
SUBMODULE = "kpeft_said"  # where the component (θ^d, λ) lives in the model


# ---------------------------------------------------------------- the Fastfood projection
def fwht(x: torch.Tensor, radix: int = 16) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform ``x Hᵀ = x H`` over the last dimension (a power of
    two n), in Sylvester (natural) order: O(n log n), no n×n matrix.

    ``H_n = H_2^{⊗k}`` acts bit by bit on the index, so the k butterfly levels are taken
    ``log₂ radix`` at a time: one product with the small ``H_r`` on the lowest bits of the index
    (x viewed as ``(…, n/r, r)``), then a transpose that rotates those bits to the top. After all
    k bits the rotations add up to the identity. Autograd keeps only the small ``H_r``."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    bits, done = n.bit_length() - 1, 0
    while done < bits:
        r = min(radix, 1 << (bits - done))
        x = (x.reshape(*lead, n // r, r) @ _hadamard(r, x.dtype, x.device)).transpose(-1, -2)
        done += r.bit_length() - 1
    return x.reshape(*lead, n)


_HADAMARD: dict[tuple, torch.Tensor] = {}


def _hadamard(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Sylvester Hadamard matrix ``H_r = H_2^{⊗log₂ r}`` (r ≤ radix: a few hundred numbers)."""
    key = (r, dtype, device)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=dtype)
        while h.shape[0] < r:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = h.to(device)
    return _HADAMARD[key]


class Fastfood:
    """``P: R^d → R^D`` of the module docstring (not an nn.Module: its random tensors are
    regenerated from the seed, never saved, and never broadcast by DDP)."""

    def __init__(self, d: int, D: int, seed: int):
        if d < 1 or D < 1:
            raise ValueError(f"Fastfood needs d >= 1 and D >= 1, got d={d}, D={D}")
        self.d, self.D, self.seed = d, D, int(seed)
        self.block = 1 << (d - 1).bit_length()  # d' = 2^⌈log₂ d⌉
        self.n_blocks = -(-D // self.block)
        self._tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def generate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, Π, G)`` on the CPU from the seed: signs ``(n, d')`` int8, the permutations as flat
        indices into the stacked blocks, and ``G_j / (σ_j √D)`` ``(n, d')`` float32."""
        gen = torch.Generator().manual_seed(self.seed)
        n, m = self.n_blocks, self.block
        signs = torch.randint(0, 2, (n, m), generator=gen, dtype=torch.int8).mul_(2).sub_(1)
        index_dtype = torch.int32 if n * m < 2**31 else torch.int64
        perm = torch.empty(n, m, dtype=index_dtype)
        for j in range(n):
            perm[j] = torch.randperm(m, generator=gen) + j * m
        gauss = torch.randn(n, m, generator=gen)
        gauss /= gauss.norm(dim=1, keepdim=True) * math.sqrt(self.D)
        return signs, perm.flatten(), gauss

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self.generate()
        if self._tensors[0].device != device:
            self._tensors = tuple(t.to(device) for t in self._tensors)
        return self._tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``P x`` for ``x ∈ R^d`` (float32), differentiable in x."""
        signs, perm, gauss = self.tensors(x.device)
        if self.block > self.d:
            x = F.pad(x, (0, self.block - self.d))
        y = fwht(x * signs)  # H B_j x, every block at once: (n, d')
        y = y.flatten().index_select(0, perm).view(self.n_blocks, self.block)  # Π_j
        y = fwht(y * gauss)  # H G_j Π_j H B_j x / (σ_j √D)
        return y.flatten()[: self.D]


# ---------------------------------------------------------------- the component
@dataclass
class Piece:
    """One perturbed tensor i: a backbone parameter, or a block of one (GPT-2's fused c_attn q/k/v)."""

    name: str
    param: nn.Parameter
    region: tuple[int, int, int] | None  # (dim, start, stop) inside `param`, or None for all of it
    offset: int  # where P(θ^d)_i starts in the D-vector
    index: int  # its λ

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.target().shape)

    @property
    def numel(self) -> int:
        return self.target().numel()

    def target(self) -> torch.Tensor:
        """The perturbed part of the parameter (a view)."""
        if self.region is None:
            return self.param
        dim, start, stop = self.region
        return self.param.narrow(dim, start, stop - start)


class SAID(Component):
    """θ^d (and λ) with the Fastfood projection; installed by :func:`build_said`."""

    site = "model"  # it reparameterises backbone tensors wherever they are
    mergeable = False  # not through AdaptedModel.merge(): use SAID.merge() (see the module docstring)

    def __init__(self, pieces: list[Piece], d: int, seed: int, structured: bool = True, device=None):
        super().__init__()
        self.pieces = pieces
        self.d, self.D = d, sum(p.numel for p in pieces)
        self.structured = structured
        self.projection = Fastfood(d, self.D, seed)
        self.theta_d = nn.Parameter(torch.zeros(d, device=device))  # θ^d = 0: the frozen model
        self.lambdas = nn.Parameter(torch.ones(len(pieces), device=device)) if structured else None
        self.merged = False
        self._sizes = [p.numel for p in pieces]  # pieces are consecutive in the D-vector (offsets)
        self._cache: tuple[torch.Tensor, ...] | None = None
        self._cache_key: tuple | None = None
        self._depth = 0  # > 0 inside a model forward (set by the hooks)
        self.projections_computed = 0  # how many times P(θ^d) was formed (efficiency tests)

    def stored_numel(self) -> int:
        """θ^d and λ, plus one number: the seed that regenerates P."""
        return super().stored_numel() + 1

    # ------------------------------------------------------------ P(θ^d), once per forward
    def project(self) -> torch.Tensor:
        """``P(θ^d)`` (float32, length D), outside autocast."""
        self.projections_computed += 1
        with torch.autocast(self.theta_d.device.type, enabled=False):
            return self.projection(self.theta_d.float())

    def split(self, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``P(θ^d)`` as one flat view per piece. One ``split`` rather than a slice per piece: a
        slice's backward writes its gradient into a zero-filled D-vector, so 148 slices of GPT-2
        cost 148 full-size fills and adds per step; ``split``'s backward is one concatenation."""
        return delta.split(self._sizes)

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The cached ``P(θ^d)`` pieces (:meth:`split`): formed once per model forward while
        training, once per value of θ^d otherwise. Outside a model forward with gradients they are
        formed afresh (never a stale graph)."""
        grad = torch.is_grad_enabled() and self.theta_d.requires_grad
        t = self.theta_d
        key = (t._version, t.data_ptr(), t.device, grad)
        reusable = not grad or self._depth > 0
        if self._cache is not None and self._cache_key == key and reusable:
            return self._cache
        out = self.split(self.project())
        if reusable:
            self._cache, self._cache_key = out, key
        return out

    def _enter(self, module, args) -> None:
        if self._depth == 0 and torch.is_grad_enabled():
            self._cache = None  # a new graph for every training forward
        self._depth += 1

    def _exit(self, module, args, output) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._cache is not None and self._cache[0].requires_grad:
            self._cache = None  # backward owns the graph now

    def update(self, piece: Piece, parts: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``λ_i P(θ^d)_i`` shaped like the piece (float32); `parts` as :meth:`parts` gives them."""
        parts = self.parts() if parts is None else parts
        out = parts[piece.index].view(piece.shape)
        return out * self.lambdas[piece.index] if self.lambdas is not None else out

    # ------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self) -> None:
        """Bake ``λ_i P(θ^d)_i`` into every perturbed tensor; the parametrizations then return the
        stored tensors unchanged (no projection runs)."""
        if not self.merged:
            parts = self.split(self.project())
            for piece in self.pieces:
                target = piece.target()
                target += self.update(piece, parts).to(target.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            parts = self.split(self.project())
            for piece in self.pieces:
                target = piece.target()
                target -= self.update(piece, parts).to(target.dtype)
            self.merged = False

    def resident_tensors(self) -> list[torch.Tensor]:
        """The Fastfood signs, permutations and Gaussian diagonals, once generated (about 9 bytes
        per perturbed parameter: more than the frozen tensors' own 4)."""
        return list(self.projection._tensors or ())

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, D={self.D}, tensors={len(self.pieces)}, structured={self.structured}, "
            f"blocks={self.projection.n_blocks}×{self.projection.block}, seed={self.projection.seed}"
        )


class _Shifted(nn.Module):
    """The parametrization of one parameter: ``W ↦ W + Σ_i λ_i P(θ^d)_i`` over its pieces."""

    def __init__(self, said: SAID, pieces: list[Piece]):
        super().__init__()
        object.__setattr__(self, "said", said)  # a plain reference: θ^d stays where it lives
        self.pieces = sorted(pieces, key=lambda p: p.region[1] if p.region else 0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        said = self.said
        if said.merged:
            return w
        parts = said.parts()
        if self.pieces[0].region is None:
            return w + said.update(self.pieces[0], parts).to(w.dtype)
        dim = self.pieces[0].region[0]  # blocks of one dimension: zeros in between
        blocks, pos = [], 0
        for piece in self.pieces:
            _, start, stop = piece.region
            if start > pos:
                blocks.append(w.new_zeros(()).expand(w.narrow(dim, pos, start - pos).shape))  # zero-stride gap
            blocks.append(said.update(piece, parts).to(w.dtype))
            pos = stop
        if pos < w.shape[dim]:
            blocks.append(w.new_zeros(()).expand(w.narrow(dim, pos, w.shape[dim] - pos).shape))
        return w + torch.cat(blocks, dim)


# ---------------------------------------------------------------- which tensors
def _params_of(modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def select_tensors(
    model: nn.Module, anatomy, targets: list[str], biases: bool = True
) -> list[tuple[str, nn.Parameter, tuple[int, int, int] | None]]:
    """The tensors `targets` name, in the model's parameter order: ``(name, parameter, region)``.

    Only frozen backbone parameters qualify (never the task head, never another component's own
    tensors); a tensor selected whole and as a block is perturbed whole."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise KpeftError(f"said.targets {list(targets)}: valid entries are {', '.join(TARGETS)}")
    head = {id(p) for p in anatomy.task_head_params}
    named = [(n, p) for n, p in model.named_parameters() if not p.requires_grad and id(p) not in head]
    blocks = [layer.block for layer in anatomy.layers]
    whole: set[int] = set()
    slices: dict[int, set[tuple[int, int, int]]] = {}
    for target in targets:
        if target == "all":
            whole |= {id(p) for _, p in named}
        elif target == "layers":
            whole |= _params_of(blocks)
        elif target == "attention":
            whole |= _params_of(att.module for _, att in anatomy.attentions("all"))
        elif target == "ffn":
            whole |= _params_of(m for layer in anatomy.layers for m in (layer.ffn, layer.ffn_out))
        elif target == "norms":
            whole |= {id(p) for _, p in LayerNormTuning().select(model)}
        elif target == "embeddings":
            inside = {id(m) for b in blocks for m in b.modules()}
            whole |= _params_of(m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside)
        else:  # q, k, v, o: the projection's weight and bias (GPT-2: its column block of c_attn)
            for _, att in anatomy.attentions("all"):
                proj = att.projection(target)
                mod = proj.module
                full = proj.out_slice is None
                w_dim = 1 if proj.layout == "conv1d" else 0
                slices.setdefault(id(mod.weight), set()).add(None if full else (w_dim, proj.start, proj.stop))
                if proj.has_bias:
                    slices.setdefault(id(mod.bias), set()).add(None if full else (0, proj.start, proj.stop))
    out = []
    for name, p in named:
        if not biases and name.rsplit(".", 1)[-1] == "bias":
            continue
        regions = slices.get(id(p), set())
        if id(p) in whole or None in regions:
            out.append((name, p, None))
        else:
            out += [(name, p, r) for r in sorted(regions)]
    return out


def _holders(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds `param` (tied embeddings / LM heads have several)."""
    return [(m, n) for m in model.modules() for n, q in m._parameters.items() if q is param]


@register("said", SAIDConfig)
def build_said(cfg: DictConfig, ctx: BuildContext) -> list[SAID]:
    """SAID (``structured``) or DID on the tensors ``cfg.targets`` names."""
    model = ctx.model
    if int(cfg.d) < 1:
        raise KpeftError(f"said.d must be >= 1, got {cfg.d}")
    chosen = select_tensors(model, ctx.anatomy, list(cfg.targets), bool(cfg.biases))
    if not chosen:
        raise KpeftError(f"said.targets={list(cfg.targets)} (biases={cfg.biases}) selects no tensor of this backbone")
    if hasattr(model, SUBMODULE):
        raise KpeftError("a model takes one said component; merge the two into one (targets is a list)")
    pieces, offset = [], 0
    for i, (name, param, region) in enumerate(chosen):
        label = name if region is None else f"{name}[{region[0]}:{region[1]}:{region[2]}]"
        piece = Piece(label, param, region, offset, i)
        pieces.append(piece)
        offset += piece.numel
    device = chosen[0][1].device
    comp = SAID(pieces, d=int(cfg.d), seed=int(cfg.seed), structured=bool(cfg.structured), device=device)
    model.add_module(SUBMODULE, comp)
    by_param: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_param.setdefault(id(piece.param), []).append(piece)
    for group in by_param.values():
        for module, attr in _holders(model, group[0].param):
            parametrize.register_parametrization(module, attr, _Shifted(comp, group), unsafe=True)
    model.register_forward_pre_hook(comp._enter)
    model.register_forward_hook(comp._exit, always_call=True)
    return [comp]
