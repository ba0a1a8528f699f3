"""Kernel-wise, Kernel-wise-lite, Kernel-mix and Kernel-mix-lite (Chen, Hazarika et al. 2022;
[KM] §4): head-specific low-rank updates of the attention matrices, in the papers' row
convention ``Y = X W + b`` (``W ∈ R^{d_in×d_out}``; head h owns the column block ``c_h`` of
W_q, W_k, W_v and the row block ``c_h`` of W_o).

Per adapted matrix, with ``s`` the scale (1 in the official code) and ``β`` a trained bias:

* **Kernel-wise** (q, k, v) ``ΔW[:, c_h] = s·B^(h) A^(h)``, ``B^(h) ∈ R^{d×r}``, ``A^(h) ∈ R^{r×p}``;
* **Kernel-wise-lite** (q, v) ``ΔW[:, c_h] = s·W_k^(h) B_k^(h) A^(h)``: the frozen key block is the
  head-specific basis, ``B_k^(h) ∈ R^{p×r}``; with GQA query head h uses KV head ⌊h·H_kv/H⌋;
* **Kernel-wise on W_o** (roles exchanged) ``ΔW_o[c_h, :] = s·Ã^(h) B̃^(h)``, ``Ã^(h) ∈ R^{p×r}``,
  ``B̃^(h) ∈ R^{r×d}``;
* **Kernel-mix(-lite)** = a shared LoRA ``s·B A`` (rank r_shared, no bias, its own dropout mask)
  plus one of the above on the same matrix; the head-specific part carries the bias ``s·β``.

Every forward is batched over the head axis (one GEMM + one einsum; no loop over heads, [KM] App. B.3).
Each branch is a :class:`~kpeft.methods.base.WeightComponent`, so merging folds ``delta_weight()``
and ``delta_bias()`` into the frozen projection and the plain backbone runs (docs/methods.md).

**The lite trick** ([KM] App. B.3): ``X W_k^(h) B_k A = K^(h) B_k A`` reuses the keys of the current
tokens instead of a second ``X W_k`` product.

* GPT-2's fused ``c_attn`` computes K in the same output as Q and V: the lite branch declares
  ``uses_base_output`` and reads K from the frozen projection's output (post-bias, as the official
  code; ``lite_basis_includes_key_bias=false`` subtracts ``b_k``). Dropout acts on K.
* Separate ``nn.Linear`` projections (BERT, T5, Llama) compute K in another module, after q (so a
  q branch cannot reuse it without depending on call order). There the branch uses the factored
  basis instead: ``M = W_k · blockdiag(B_k^(h)) ∈ R^{d×H·r}`` (and ``b_k · blockdiag(B_k^(h))``)
  is formed once per forward (``d·H·p·r`` flops, independent of the number of tokens) and applied
  as one GEMM ``X M`` — exactly ``K B_k`` without materialising K. Dropout must act on K (as in the official
  code), which this form cannot express, so while training with dropout the branch computes
  ``K = X W_k (+ b_k)`` itself (one extra frozen GEMM) and drops it. Both forms equal ``X ΔW``.
  Because the basis is always computed from the adapted projection's own input, lite-V is also
  right in T5 cross-attention (K and V share the encoder states); lite-Q there is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from kpeft.backbones.anatomy import Attention, Projection
from kpeft.methods.base import (
    WeightComponent,
    attach_weight_component,
    init_input_factor,
    init_output_factor,
    trunc_normal_001_,
)
from kpeft.methods.dropout import branch_dropout
from kpeft.methods.lowrank import LoRA
from kpeft.methods.registry import BuildContext, ComponentConfig, bias_flag, budget_sizes, register


@dataclass
class KernelMixMatrixConfig:
    """What one attention matrix (q, k, v or o) gets: a head-specific part of rank `wise` per
    head (0 = none), built on a `full` head-specific input basis or, for q/v, the `lite` one
    (the frozen key block W_k^(h)), plus a shared LoRA part of rank `shared` (0 = none)."""

    wise: int = 0
    basis: str = "full"  # full | lite (q, v only)
    shared: int = 0


@dataclass
class KernelMixConfig(ComponentConfig):
    """Kernel-wise / Kernel-wise-lite / Kernel-mix / Kernel-mix-lite ([KM] §4).

    Per adapted matrix: ``ΔW = s·(B_shared A_shared + blockwise_h B^(h) A^(h))`` plus a trained
    bias ``s·β`` carried by the head-specific part (none on the shared part).
    """

    kind: str = "kernel_mix"
    q: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    k: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    v: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    o: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    dropout: float = 0.1  # on each branch's input (lite: on the keys K), independent masks
    scale: float = 1.0  # s, for every branch (the official code: 1)
    # auto: a head-specific bias β iff the adapted projection has a bias (GPT-2/BERT yes, T5/Llama no).
    train_bias: str = "auto"  # auto | true | false
    init: str = "kaiming_zero"  # kaiming_zero | houlsby | zero_zero (all zero; tests only)
    # Lite: the basis is the post-bias key X W_k + b_k as in the official code (merge adds b_k B_k A
    # to the bias); false = the paper's X W_k.
    lite_basis_includes_key_bias: bool = True
    tie_o_to_v: bool = False  # O ranks := V ranks (the official code)
    attention: str = "self"  # self | cross | all


@dataclass
class KernelWiseConfig(KernelMixConfig):
    """Kernel-wise(-lite): Kernel-mix without shared parts (every ``shared`` must be 0)."""

    kind: str = "kernel_wise"


@budget_sizes("kernel_mix_lite_qv", "kernel_mix_qvo", "kernel_wise_lite_qv", "kernel_wise_mq", "kernel_wise_mv", "kernel_wise_qvo")
@dataclass
class KernelMixSize:
    """One row of Kernel-mix Table B.5: head-specific (``*_wise``) and shared (``*_lora``) ranks;
    whether a head-specific part is lite is the method's choice, not the budget's."""

    q_wise: int = 0
    q_lora: int = 0
    v_wise: int = 0
    v_lora: int = 0
    o_wise: int = 0
    o_lora: int = 0

TARGETS = ("q", "k", "v", "o")
BASES = ("full", "lite")


class HeadwiseBranch(WeightComponent):
    """What the head-specific branches share: heads, rank, dropout, scale and the bias β."""

    def __init__(
        self,
        projection: Projection,
        heads: int,
        head_dim: int,
        r: int,
        dropout: float = 0.0,
        scale: float = 1.0,
        train_bias: bool = False,
        init: str = "kaiming_zero",
    ):
        super().__init__(projection)
        if r < 1:
            raise ValueError(f"head-specific rank must be >= 1, got {r}")
        self.heads, self.head_dim, self.r = heads, head_dim, r
        self.scaling = float(scale)
        self.init_scheme = init
        ref = projection.module.weight
        self._kw = {"device": ref.device, "dtype": ref.dtype}
        self.dropout = branch_dropout(dropout)
        self.head_bias = nn.Parameter(torch.zeros(self.d_out, **self._kw)) if train_bias else None
        if self.head_bias is not None and init == "houlsby":
            trunc_normal_001_(self.head_bias)

    def _factors(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], fan_in: int) -> None:
        """Create and initialise the input-side factor (Kaiming bound ``1/√fan_in`` with the
        fan-in of *one head's* factor, not torch's fan-in of the 3-D tensor) and the output-side
        factor (zero: ΔW = 0 at step 0), or both ``houlsby``."""
        self.head_in = nn.Parameter(torch.empty(in_shape, **self._kw))
        self.head_out = nn.Parameter(torch.empty(out_shape, **self._kw))
        init_input_factor(self.head_in, self.init_scheme, fan_in=fan_in)
        init_output_factor(self.head_out, self.init_scheme)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.head_bias is not None:
            out = out + self.head_bias
        return out * self.scaling if self.scaling != 1.0 else out

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.head_bias is None else self.head_bias * self.scaling

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, heads={self.heads}, head_dim={self.head_dim}, "
            f"r={self.r}, scaling={self.scaling:g}, bias={self.head_bias is not None}"
        )


class KernelWise(HeadwiseBranch):
    """Full head-specific update of W_q, W_k or W_v: ``ΔW[:, c_h] = s·B^(h) A^(h)``.

    ``head_in (H, r, d_in)`` stacks the ``B^(h)ᵀ`` (one GEMM with ``(d_in, H·r)``),
    ``head_out (H, r, p)`` the ``A^(h)``.
    """

    def __init__(self, projection: Projection, heads: int, head_dim: int, r: int, **kw):
        super().__init__(projection, heads, head_dim, r, **kw)
        if self.d_out != heads * head_dim:
            raise ValueError(f"Kernel-wise: output width {self.d_out} is not {heads} heads × {head_dim}")
        self._factors((heads, r, self.d_in), (heads, r, head_dim), fan_in=self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.head_in.reshape(-1, self.d_in))  # (…, H·r)
        z = z.unflatten(-1, (self.heads, self.r))
        out = torch.einsum("...hr,hrp->...hp", z, self.head_out).flatten(-2)
        return self._finish(out)

    def delta_weight(self) -> torch.Tensor:
        dw = torch.einsum("hrd,hrp->dhp", self.head_in, self.head_out).reshape(self.d_in, self.d_out)
        return dw * self.scaling


class KernelWiseLite(HeadwiseBranch):
    """Lite update of W_q or W_v with the frozen key block as basis:
    ``ΔW[:, c_h] = s·W_k^(g(h)) B_k^(h) A^(h)``, ``g(h) = ⌊h·H_kv/H⌋`` (GQA; identity for V).

    ``head_in (H, p, r)`` holds the ``B_k^(h)``, ``head_out (H, r, p)`` the ``A^(h)``. With
    ``key_bias`` the basis is the post-bias key ``X W_k + b_k`` (official code) and merging also adds
    ``s·b_k^(g(h)) B_k^(h) A^(h)`` to the bias.
    """

    def __init__(
        self,
        projection: Projection,
        key: Projection,
        heads: int,
        kv_heads: int,
        head_dim: int,
        r: int,
        key_bias: bool = True,
        **kw,
    ):
        super().__init__(projection, heads, head_dim, r, **kw)
        if self.d_out != heads * head_dim or key.d_out != kv_heads * head_dim or key.d_in != self.d_in:
            raise ValueError(
                f"Kernel-wise-lite: the adapted block ({self.d_in}→{self.d_out}, {heads} heads) and the key "
                f"block ({key.d_in}→{key.d_out}, {kv_heads} heads) of head size {head_dim} do not fit"
            )
        if heads % kv_heads:
            raise ValueError(f"Kernel-wise-lite: {heads} heads are not a multiple of {kv_heads} KV heads")
        object.__setattr__(self, "key", key)  # a handle into the frozen backbone, not a submodule
        self.kv_heads = kv_heads
        self.key_bias = key_bias and key.has_bias
        # GPT-2's fused c_attn: K is in the frozen projection's own output (the lite trick).
        self.uses_base_output = key.parent is projection.parent and key.attr == projection.attr
        group = torch.arange(heads, device=self._kw["device"]) * kv_heads // heads
        self.register_buffer("kv_of_head", group, persistent=False)
        self._factors((heads, head_dim, r), (heads, r, head_dim), fan_in=head_dim)

    def _per_head(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """Split the key width of `t` at `axis` into (H_kv, p) and map KV heads to adapted heads."""
        axis = axis % t.dim()  # the head axis after the split
        t = t.unflatten(axis, (self.kv_heads, self.head_dim))
        return t if self.kv_heads == self.heads else t.index_select(axis, self.kv_of_head)

    def _key_bias(self) -> torch.Tensor | None:
        return self.key.bias() if self.key_bias else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_base_output or (self.training and isinstance(self.dropout, nn.Dropout)):
            if self.uses_base_output:  # the keys of the current tokens, from c_attn's output
                keys = y[..., self.key.start : self.key.stop]
                if self.key.has_bias and not self.key_bias:
                    keys = keys - self.key.bias()
            else:  # training with dropout: Drop acts on K, so K is needed
                keys = F.linear(x, self.key.weight().t(), self._key_bias())
            keys = self._per_head(self.dropout(keys), -1)  # (…, H, p)
            z = torch.einsum("...hp,hpr->...hr", keys, self.head_in)
        else:  # K B_k = X (W_k blockdiag(B_k)) + b_k blockdiag(B_k): one (d, H·r) basis per forward
            basis = torch.einsum("dhp,hpr->hrd", self._per_head(self.key.weight(), 1), self.head_in)
            kb = self._key_bias()
            kb = None if kb is None else torch.einsum("hp,hpr->hr", self._per_head(kb, 0), self.head_in).flatten()
            z = F.linear(x, basis.reshape(-1, self.d_in), kb).unflatten(-1, (self.heads, self.r))
        out = torch.einsum("...hr,hrp->...hp", z, self.head_out).flatten(-2)
        return self._finish(out)

    def _bk_a(self) -> torch.Tensor:
        return torch.einsum("hpr,hrq->hpq", self.head_in, self.head_out)  # B_k^(h) A^(h): (H, p, p)

    def delta_weight(self) -> torch.Tensor:
        wk = self._per_head(self.key.weight(), 1)  # (d_in, H, p): W_k^(g(h))
        dw = torch.einsum("dhp,hpq->dhq", wk, self._bk_a()).reshape(self.d_in, self.d_out)
        return dw * self.scaling

    def delta_bias(self) -> torch.Tensor | None:
        kb = self._key_bias()
        if kb is None:
            return super().delta_bias()
        db = torch.einsum("hp,hpq->hq", self._per_head(kb, 0), self._bk_a()).flatten()
        if self.head_bias is not None:
            db = db + self.head_bias
        return db * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kv_heads={self.kv_heads}, key_bias={self.key_bias}, fused={self.uses_base_output}"


class KernelWiseOut(HeadwiseBranch):
    """Head-specific update of W_o with the roles exchanged: ``ΔW_o[c_h, :] = s·Ã^(h) B̃^(h)``.

    The input is the per-head attention output before head merging, ``(…, H·p)`` → ``(…, H, p)``;
    ``head_in (H, p, r)`` holds the ``Ã^(h)`` (einsum), ``head_out (H·r, d)`` stacks the ``B̃^(h)``
    (one GEMM).
    """

    def __init__(self, projection: Projection, heads: int, head_dim: int, r: int, **kw):
        super().__init__(projection, heads, head_dim, r, **kw)
        if self.d_in != heads * head_dim:
            raise ValueError(f"Kernel-wise on W_o: input width {self.d_in} is not {heads} heads × {head_dim}")
        self._factors((heads, head_dim, r), (heads * r, self.d_out), fan_in=head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.dropout(x).unflatten(-1, (self.heads, self.head_dim))
        z = torch.einsum("...hp,hpr->...hr", o, self.head_in).flatten(-2)  # (…, H·r)
        return self._finish(z @ self.head_out)

    def delta_weight(self) -> torch.Tensor:
        b = self.head_out.view(self.heads, self.r, self.d_out)
        dw = torch.einsum("hpr,hrd->hpd", self.head_in, b).reshape(self.d_in, self.d_out)
        return dw * self.scaling


def shared_lora(projection: Projection, r: int, dropout: float, scale: float, init: str) -> LoRA:
    """Kernel-mix's shared part: a plain LoRA of rank r, no bias, scale s (not α/r), own dropout."""
    comp = LoRA(projection, r=r, alpha=float(r), dropout=dropout, train_bias=False, init=init)
    comp.scaling = float(scale)
    return comp


# ---------------------------------------------------------------- builder


def _specs(cfg: DictConfig, fidelity: str) -> dict[str, tuple[int, str, int]]:
    """``target -> (wise rank, basis, shared rank)``, validated; O tied to V where asked."""
    specs = {t: (int(cfg[t].wise), str(cfg[t].basis), int(cfg[t].shared)) for t in TARGETS}
    for t, (wise, basis, shared) in specs.items():
        if wise < 0 or shared < 0:
            raise ValueError(f"{cfg.kind}.{t}: ranks must be >= 0, got wise={wise}, shared={shared}")
        if basis not in BASES:
            raise ValueError(f"{cfg.kind}.{t}.basis must be full or lite, not {basis!r}")
        if basis == "lite" and t not in ("q", "v"):
            raise ValueError(f"{cfg.kind}.{t}: the lite basis (the key block) is for q and v only")
        if shared and cfg.kind == "kernel_wise":
            raise ValueError(f"kernel_wise.{t}.shared={shared}: Kernel-wise has no shared part; use kind kernel_mix")
    lite = any(specs[t][0] and specs[t][1] == "lite" for t in ("q", "v"))
    if lite and (specs["k"][0] or specs["k"][2]):
        raise ValueError(f"{cfg.kind}: the lite basis is the frozen W_k; do not adapt k in the same method")
    o_wise, _, o_shared = specs["o"]
    if (cfg.tie_o_to_v or fidelity == "code") and (o_wise or o_shared):
        specs["o"] = (specs["v"][0], "full", specs["v"][2])  # the official code's O ranks
    if not any(wise or shared for wise, _, shared in specs.values()):
        raise ValueError(f"{cfg.kind}: every rank is 0, nothing to adapt")
    return specs


def _branches(
    att: Attention, target: str, spec: tuple[int, str, int], cfg: DictConfig, ctx: BuildContext
) -> list[WeightComponent]:
    wise, basis, shared = spec
    code = ctx.fidelity == "code"
    init = "houlsby" if code else str(cfg.init)
    proj = att.projection(target)
    comps: list[WeightComponent] = []
    if shared:
        comps.append(shared_lora(proj, shared, cfg.dropout, cfg.scale, init))
    if wise:
        heads = att.num_kv_heads if target in ("k", "v") else att.num_heads
        kw = {"dropout": cfg.dropout, "scale": cfg.scale, "init": init,
              "train_bias": bias_flag(cfg.train_bias, proj.has_bias)}
        if target == "o":
            comps.append(KernelWiseOut(proj, heads, att.head_dim, wise, **kw))
        elif basis == "full":
            comps.append(KernelWise(proj, heads, att.head_dim, wise, **kw))
        else:
            if att.kind == "cross" and target == "q":
                raise ValueError(
                    "Kernel-wise-lite on W_q is undefined in cross-attention (its key basis comes from the "
                    "encoder states, not the decoder's): use q.basis=full there, or attention=self"
                )
            key_bias = True if code else bool(cfg.lite_basis_includes_key_bias)
            comps.append(KernelWiseLite(proj, att.k, heads, att.num_kv_heads, att.head_dim, wise,
                                        key_bias=key_bias, **kw))
    return comps


@register("kernel_wise", KernelWiseConfig)
@register("kernel_mix", KernelMixConfig)
def build_kernel_mix(cfg: DictConfig, ctx: BuildContext) -> list[WeightComponent]:
    """Kernel-wise / Kernel-mix branches on every ``cfg.attention`` module (self | cross | all).

    ``fidelity=code`` reproduces the official code (docs/deviations.md): ``houlsby`` init for every factor and
    bias, O ranks tied to V ranks, and the post-bias key as lite basis — whatever ``init``,
    ``tie_o_to_v`` and ``lite_basis_includes_key_bias`` say.
    """
    specs = _specs(cfg, ctx.fidelity)
    comps = [
        comp
        for _, att in ctx.anatomy.attentions(cfg.attention)
        for t in TARGETS
        for comp in _branches(att, t, specs[t], cfg, ctx)
    ]
    for comp in comps:  # every branch is built (and checked) before the backbone changes
        attach_weight_component(comp)
    return comps
