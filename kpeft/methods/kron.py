"""Kronecker adapters (Edalati et al. 2022, "KronA").

* **KronA** (weight site, mergeable; Eq. 3–4): a branch parallel to a projection ``W ∈ R^{d_in×d_out}``

      Y = X W + s · X (A ⊗ B),   A ∈ R^{m1×n1},  B ∈ R^{m2×n2},  m1·m2 = d_in,  n1·n2 = d_out

  computed without forming ``A ⊗ B`` ([KA] Eq. 2, row-major rule): reshape ``x`` to ``(…, m1, m2)``,
  ``Y = Aᵀ · X · B`` ``(…, n1, n2)``, flatten: one batched einsum whose contraction order is the
  cheaper of ``(AᵀX)B`` (``m2·n1·(m1+n2)`` multiply-adds per token) and ``Aᵀ(XB)``
  (``m1·n2·(m2+n1)``). Merging folds ``s·(A ⊗ B)`` (``torch.kron``, same block layout) into ``W``.
* **KronA^B** (block site, parallel to the FFN, not mergeable; Eq. 5): ``n_modules`` Kronecker
  modules on the FFN input ``X`` (after the norm), added to the FFN output before dropout/residual::

      FFN_out ← FFN(X) + s · Σ_k ( X (A_k ⊗ B_k) + b_k )

  with ``n_bias`` = 1: an output bias ``b_k ∈ R^d`` per module; 2: also a bias ``C_k ∈ R^{n1×m2}``
  on the intermediate product, ``(A_kᵀ X + C_k) B_k`` ([KA] Eq. 5, our reading); 0: none.
* **KronA^B_res** (Eq. 6): plus ``s_res · X`` with a learnable ``s_res`` initialised to 1 (no
  sigmoid): one per Kronecker module (``residual_sharing=module``, so two modules add
  ``(s_res,1 + s_res,2)·X``), one per FFN (``ffn``) or one for the whole model (``model``).

Init (Table 4): ``A ~`` Kaiming-uniform(a=√5) as torch applies it to the stored ``(m1, n1)`` tensor
(bound ``1/√n1``), ``B = 0`` ⇒ ``ΔW = 0``; ``s = 1`` (KronA). Our reconstruction (docs/deviations.md) of the
0.07% budget also trains T5's LayerNorms (the method's ``train_layernorm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import MISSING, DictConfig
from torch import nn

from kpeft.backbones.anatomy import Projection
from kpeft.methods.base import Component, WeightComponent, attach_weight_component
from kpeft.methods.block import BlockComponent, attach_parallel_ffn
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class KronAConfig(ComponentConfig):
    """KronA ([KA] Eq. 3–4): Y = XW + s·X(A ⊗ B), A = (m1, n1), B = (m2, n2), m1·m2 = d_in, n1·n2 = d_out."""

    kind: str = "krona"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    a_shape: list[int] | None = MISSING
    # null: derived from a_shape and each adapted matrix. (MISSING, not None, by default: OmegaConf
    # 2.3 resolves an interpolation merged into a None list node at composition time.)
    b_shape: list[int] | None = MISSING
    scale: float = 1.0  # s (1 in all of KronA's experiments)
    init: str = "kaiming_zero"  # kaiming_zero (A ~ KU, B = 0) | normal (both N(0, 1/d_in)) | zero_zero
    attention: str = "self"  # self | cross | all


@dataclass
class KronABConfig(ComponentConfig):
    """KronA^B ([KA] Eq. 5): FFN_out ← FFN(X) + s·Σ_k (X(A_k ⊗ B_k) + b_k), X = the FFN input;
    with ``residual_scale`` (KronA^B_res, §5.4) also + s_res·X, s_res learnable."""

    kind: str = "krona_b"
    a_shape: list[int] | None = MISSING
    b_shape: list[int] | None = MISSING  # null: derived from a_shape and the model width
    n_modules: int = 2  # Kronecker modules per FFN, summed
    scale: float = 16.0  # s (Table 17: 4 or 16 per task)
    n_bias: int = 1  # 0: none | 1: output bias b_k ∈ R^d | 2: also C_k ∈ R^{n1×m2} on A_kᵀX (our reading)
    residual_scale: float | None = None  # initial s_res (learnable); null = no residual term
    residual_sharing: str = "module"  # module (one s_res per Kronecker module) | ffn | model
    init: str = "kaiming_zero"  # kaiming_zero | normal | zero_zero


@dataclass
class KronABResConfig(KronABConfig):
    """KronA^B_res ([KA] Eq. 6): KronA^B + s_res·X, s_res initialised to 1."""

    kind: str = "krona_b_res"
    residual_scale: float | None = 1.0


@budget_sizes("krona")
@dataclass
class KronASize:
    """KronA's size at a budget (``budget.krona``), and our reading (docs/deviations.md) of where it goes."""

    a_shape: list[int] = MISSING  # A = (m1, n1)
    b_shape: list[int] | None = None  # B = (m2, n2); null: derived from A
    attention: str = "self"  # self | cross | all (t5_glue: all 36 attention modules)
    train_layernorm: bool = False  # t5_glue: true (the Compacter recipe)


@budget_sizes("krona_b")
@dataclass
class KronABSize:
    """KronA^B(_res)'s size at a budget (``budget.krona_b``)."""

    a_shape: list[int] = MISSING
    b_shape: list[int] | None = None
    n_modules: int = 2
    train_layernorm: bool = False

Shape = tuple[int, int]
INITS = ("kaiming_zero", "normal", "zero_zero")
RESIDUAL_SHARING = ("module", "ffn", "model")


# ---------------------------------------------------------------- algebra


def factor_pairs(n: int) -> list[Shape]:
    """Every ``(a, n // a)`` with ``a | n``."""
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


def _closest_divisor(n: int, target: int) -> int:
    return min((a for a, _ in factor_pairs(n)), key=lambda a: (abs(a - target), a))


def _listed(n: int) -> str:
    return " ".join(f"({p},{q})" for p, q in factor_pairs(n))


def _as_shape(value: Sequence[int] | None, name: str) -> Shape | None:
    if value is None:
        return None
    shape = tuple(int(v) for v in value)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"KronA {name} must be two positive integers [rows, cols], got {list(value)}")
    return shape  # type: ignore[return-value]


def kron_shapes(
    a_shape: Sequence[int] | None, b_shape: Sequence[int] | None, d_in: int, d_out: int, where: str = ""
) -> tuple[Shape, Shape]:
    """Check ``A = (m1, n1)``, ``B = (m2, n2)`` against a ``d_in → d_out`` map (``m1·m2 = d_in``,
    ``n1·n2 = d_out``); a missing factor (None) is derived from the other. A mismatch is a
    ValueError listing the valid factor pairs and a nearby valid choice."""
    a, b = _as_shape(a_shape, "a_shape"), _as_shape(b_shape, "b_shape")
    if a is None and b is None:
        raise ValueError("KronA needs a_shape or b_shape (the other is derived from the adapted matrix)")
    if b is None and d_in % a[0] == 0 and d_out % a[1] == 0:
        b = (d_in // a[0], d_out // a[1])
    elif a is None and d_in % b[0] == 0 and d_out % b[1] == 0:
        a = (d_in // b[0], d_out // b[1])
    if a is not None and b is not None and a[0] * b[0] == d_in and a[1] * b[1] == d_out:
        return a, b
    m1 = _closest_divisor(d_in, a[0] if a else d_in // b[0])
    n1 = _closest_divisor(d_out, a[1] if a else d_out // b[1])
    given = f"a_shape={list(a) if a else None} b_shape={list(b) if b else None}"
    msg = (
        f"KronA factors {given} do not fit {where or 'the adapted matrix'} ({d_in}→{d_out}): "
        f"A=(m1,n1), B=(m2,n2) need m1·m2 = d_in = {d_in} and n1·n2 = d_out = {d_out}; "
        f"valid (m1,m2): {_listed(d_in)}; valid (n1,n2): {_listed(d_out)}; "
        f"e.g. a_shape=[{m1},{n1}] b_shape=[{d_in // m1},{d_out // n1}] (or b_shape=null to derive B from A)"
    )
    raise ValueError(msg)


def kron_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x @ (A ⊗ B)`` for ``x (…, m1·m2)``, without forming ``A ⊗ B``: reshape to ``(…, m1, m2)``,
    ``Aᵀ X B`` ``(…, n1, n2)``, flatten ([KA] Eq. 2). One einsum; its operands are ordered so that
    torch's left-to-right contraction takes the cheaper path (with opt_einsum installed, torch
    picks the optimal path itself)."""
    (m1, n1), (m2, n2) = A.shape, B.shape
    lead = x.shape[:-1]
    X = x.reshape(*lead, m1, m2)
    if m2 * n1 * (m1 + n2) <= m1 * n2 * (m2 + n1):
        Y = torch.einsum("...ij,ia,jb->...ab", X, A, B)  # (Aᵀ X) B
    else:
        Y = torch.einsum("...ij,jb,ia->...ab", X, B, A)  # Aᵀ (X B)
    return Y.reshape(*lead, n1 * n2)


@torch.no_grad()
def init_kron_factors(A: torch.Tensor, B: torch.Tensor, scheme: str, d_in: int) -> None:
    """``kaiming_zero``: A ~ Kaiming-uniform(a=√5) with torch's fan-in of the 2-D ``(m1, n1)``
    factor (bound ``1/√n1``; a stacked ``(k, m1, n1)`` tensor is initialised per module), B = 0
    (KronA Table 4); ``normal``: both ~ N(0, std 1/√d_in) (Table 4's worse alternative; ΔW ≠ 0);
    ``zero_zero``: both 0 (tests)."""
    if scheme == "kaiming_zero":
        bound = 1.0 / math.sqrt(A.shape[-1])  # = kaiming_uniform_(A, a=√5) for a 2-D (m1, n1) A
        nn.init.uniform_(A, -bound, bound)
        nn.init.zeros_(B)
    elif scheme == "normal":
        nn.init.normal_(A, 0.0, 1.0 / math.sqrt(d_in))
        nn.init.normal_(B, 0.0, 1.0 / math.sqrt(d_in))
    elif scheme == "zero_zero":
        nn.init.zeros_(A)
        nn.init.zeros_(B)
    else:
        raise ValueError(f"unknown KronA init {scheme!r}; valid: {', '.join(INITS)}")


# ---------------------------------------------------------------- KronA (weight site)


class KronA(WeightComponent):
    """``s · x (A ⊗ B)`` parallel to one projection (or one column block of GPT-2's ``c_attn``)."""

    def __init__(
        self,
        projection: Projection,
        a_shape: Sequence[int] | None,
        b_shape: Sequence[int] | None = None,
        scale: float = 1.0,
        init: str = "kaiming_zero",
        where: str = "",
    ):
        super().__init__(projection)
        (m1, n1), (m2, n2) = kron_shapes(a_shape, b_shape, self.d_in, self.d_out, where)
        ref = projection.module.weight
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.scaling = float(scale)
        self.A = nn.Parameter(torch.empty(m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(m2, n2, **kw))
        init_kron_factors(self.A, self.B, init, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_matmul(x, self.A, self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.A, self.B) * self.scaling  # row convention (m1·m2, n1·n2) = (d_in, d_out)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, "
            f"scaling={self.scaling:g}"
        )


@register("krona", KronAConfig)
def build_krona(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """KronA on ``cfg.targets`` of every ``cfg.attention`` module (self | cross | all); every
    branch is checked before any is installed."""
    comps: list[KronA] = []
    for layer, att in ctx.anatomy.attentions(cfg.attention):
        for target in cfg.targets:
            proj = att.projection(target)
            where = f"{layer.stack} layer {layer.index} {att.kind}-attention {target}"
            comps.append(KronA(proj, cfg.a_shape, cfg.b_shape, scale=cfg.scale, init=cfg.init, where=where))
    for comp in comps:
        attach_weight_component(comp)
    return list(comps)


# ---------------------------------------------------------------- KronA^B(_res) (block site)


class KronAB(BlockComponent):
    """``s · Σ_k (x (A_k ⊗ B_k) + b_k) [+ Σ s_res · x]`` parallel to one FFN; the ``n_modules``
    factors are stacked, so all modules run in one einsum."""

    def __init__(
        self,
        d: int,
        a_shape: Sequence[int] | None,
        b_shape: Sequence[int] | None = None,
        *,
        n_modules: int = 2,
        scale: float = 1.0,
        n_bias: int = 1,
        residual: nn.Parameter | None = None,
        init: str = "kaiming_zero",
        ref: torch.Tensor | None = None,
        where: str = "",
    ):
        super().__init__(d, d)
        if n_modules < 1:
            raise ValueError(f"KronA^B n_modules must be >= 1, got {n_modules}")
        if n_bias not in (0, 1, 2):
            raise ValueError(f"KronA^B n_bias must be 0, 1 or 2, got {n_bias}")
        (m1, n1), (m2, n2) = kron_shapes(a_shape, b_shape, d, d, where)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.n_modules, self.n_bias, self.scaling = n_modules, n_bias, float(scale)
        self.A = nn.Parameter(torch.empty(n_modules, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(n_modules, m2, n2, **kw))
        init_kron_factors(self.A, self.B, init, d)
        self.bias = nn.Parameter(torch.zeros(n_modules, d, **kw)) if n_bias >= 1 else None
        self.mid_bias = nn.Parameter(torch.zeros(n_modules, n1, m2, **kw)) if n_bias >= 2 else None
        self.residual_scale = residual  # (n_modules,) own, (1,) own, or (1,) shared by the model

    def kron(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_k x (A_k ⊗ B_k)`` (with the intermediate bias when ``n_bias = 2``)."""
        (_, m1, n1), (_, m2, n2) = self.A.shape, self.B.shape
        lead = x.shape[:-1]
        X = x.reshape(*lead, m1, m2)
        if self.mid_bias is not None:
            T = torch.einsum("...ij,kia->...kaj", X, self.A) + self.mid_bias  # A_kᵀ X + C_k
            Y = torch.einsum("...kaj,kjb->...ab", T, self.B)
        elif m2 * n1 * (m1 + n2) <= m1 * n2 * (m2 + n1):
            Y = torch.einsum("...ij,kia,kjb->...ab", X, self.A, self.B)
        else:
            Y = torch.einsum("...ij,kjb,kia->...ab", X, self.B, self.A)
        return Y.reshape(*lead, n1 * n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kron(x)
        if self.bias is not None:
            y = y + self.bias.sum(0)
        y = y * self.scaling
        if self.residual_scale is not None:
            y = y + self.residual_scale.sum() * x
        return y

    def delta_weight(self) -> torch.Tensor:
        """``s · Σ_k A_k ⊗ B_k`` (row convention): the linear part without biases or residual."""
        return sum(torch.kron(a, b) for a, b in zip(self.A, self.B)) * self.scaling

    def extra_repr(self) -> str:
        res = None if self.residual_scale is None else tuple(self.residual_scale.shape)
        return (
            f"d={self.d_in}, n_modules={self.n_modules}, A={tuple(self.A.shape[1:])}, B={tuple(self.B.shape[1:])}, "
            f"scaling={self.scaling:g}, n_bias={self.n_bias}, residual_scale={res}"
        )


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight  # Linear, Conv1D (or a kpeft wrapper, which forwards .weight)


def _build_krona_b(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    sharing = str(cfg.residual_sharing)
    if sharing not in RESIDUAL_SHARING:
        raise ValueError(f"residual_sharing must be one of {', '.join(RESIDUAL_SHARING)}, not {sharing!r}")
    d = ctx.anatomy.hidden_size
    shared: nn.Parameter | None = None
    comps: list[KronAB] = []
    for layer in ctx.anatomy.layers:
        ref = _weight(layer.ffn_out)
        residual = None
        if cfg.residual_scale is not None:
            kw = {"device": ref.device, "dtype": ref.dtype}
            if sharing == "model":
                if shared is None:
                    shared = nn.Parameter(torch.full((1,), float(cfg.residual_scale), **kw))
                residual = shared
            else:
                size = cfg.n_modules if sharing == "module" else 1
                residual = nn.Parameter(torch.full((size,), float(cfg.residual_scale), **kw))
        comps.append(
            KronAB(
                d, cfg.a_shape, cfg.b_shape, n_modules=cfg.n_modules, scale=cfg.scale, n_bias=cfg.n_bias,
                residual=residual, init=cfg.init, ref=ref, where=f"the FFN of {layer.stack} layer {layer.index}",
            )
        )
    for layer, comp in zip(ctx.anatomy.layers, comps, strict=True):
        attach_parallel_ffn(layer, comp)
    return list(comps)


@register("krona_b", KronABConfig)
def build_krona_b(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """KronA^B: ``n_modules`` Kronecker modules parallel to every FFN (Eq. 5)."""
    return _build_krona_b(cfg, ctx)


@register("krona_b_res", KronABResConfig)
def build_krona_b_res(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """KronA^B_res: KronA^B plus the learnable residual scale ``s_res · X`` (Eq. 6)."""
    if cfg.residual_scale is None:
        raise ValueError("krona_b_res needs residual_scale (the initial s_res, 1 in the paper)")
    return _build_krona_b(cfg, ctx)
