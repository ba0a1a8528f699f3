"""Adapter baselines at the block site (Lin et al. 2020; Karimi Mahabadi et al. 2021; He et al. 2022; [IT] Table 5).

* ``adapter`` — a bottleneck adapter ``Δ(h) = s·(W_up act(W_down LN_a(h) + b_d) + b_u)``:

  - **sequential** placements add ``Δ(h)`` to a site's own output ``h`` (``h ← h + Δ(h)``):
    ``block_end`` (Lin et al. 2020 / VGLM: the block output, after the FFN residual add),
    ``attn_out`` (the official pfeiffer-adapter code: W_o's output, before residual dropout and
    add), ``ffn_out`` (the FFN output before its dropout and residual add);
  - ``ffn_parallel`` (He et al.): ``FFN_out ← FFN(x) + Δ(x)``, x = the FFN input, through
    :func:`kpeft.methods.block.attach_parallel_ffn`.

  Adapter-r (Lin), the parallel adapter, the MAM adapter's and the MAM inducer's FFN adapters are
  this one component with different options (see the method YAMLs).
* ``compacter`` — Houlsby-placed sequential adapters (after the attention output and after the FFN
  output) whose down/up projections are PHM layers ``W = Σ_i A_i ⊗ B_i``, ``B_i = s_i t_iᵀ``,
  with one n×n×n rule tensor ``A`` shared by every PHM layer of the model (one ``nn.Parameter``
  registered in every adapter; ``named_parameters`` and the optimizer see it once).

Sequential hooks are forward hooks on the modules the anatomy names (no modeling code is forked;
the model's own layer loop calls them). The component is registered as a submodule of the hooked
module (``<module>.kpeft_sequential.<i>``); :meth:`SequentialHandle.remove` restores the backbone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import MISSING, DictConfig
from torch import nn
from transformers.activations import ACT2FN

from kpeft.backbones.anatomy import Layer
from kpeft.methods.base import Component
from kpeft.methods.block import BlockComponent, add_child, attach_parallel_ffn, remove_child
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class AdapterConfig(ComponentConfig):
    """Bottleneck adapter (Lin et al. 2020; He et al. 2022; [IT] Table 5): ``Δ(h) = s·(W_up act(W_down LN_a(h) + b_d) + b_u)``.
    Sequential placements add Δ(h) to the site's own output h; ``ffn_parallel`` adds Δ(x) of the FFN
    input x to the FFN output (He et al.'s parallel adapter)."""

    kind: str = "adapter"
    bottleneck: int = MISSING
    # block_end: on the block output, after the FFN residual add (Lin et al. / VGLM) | attn_out: on
    # W_o's output before residual dropout and add (the official pfeiffer-adapter code) | ffn_out:
    # on the FFN output | ffn_parallel: FFN_out ← FFN(x) + Δ(x) (He et al.)
    placement: str = "block_end"
    layernorm: bool = True  # LN_a, the adapter's own trainable LayerNorm on its input
    act: str = "relu"  # any transformers ACT2FN name (relu, gelu_new, ...)
    scale: float = 1.0  # s
    dropout: float = 0.0  # on the bottleneck (after the activation)
    init: str = "hf_normal"  # hf_normal: N(0, 0.02) weights, zero biases | lora: down Kaiming, up 0 | zero_zero


@dataclass
class CompacterConfig(ComponentConfig):
    """Compacter (Karimi Mahabadi et al. 2021): Houlsby-placed adapters whose projections are PHM layers
    ``W = Σ_i A_i ⊗ (s_i t_iᵀ)``, the n×n×n rule tensor A shared by every PHM layer of the model."""

    kind: str = "compacter"
    bottleneck: int = MISSING
    n: int = 4
    phm_rank: int = 1  # rank of B_i = s_i t_iᵀ
    shared_rule: bool = True
    placement: str = "houlsby"  # houlsby (after attention output and FFN output) | ffn_out
    layernorm: bool = False  # a trainable LayerNorm on each adapter's input
    act: str = "gelu_new"
    rule_init_std: float = 1e-4


@budget_sizes("adapter", "parallel_adapter")
@dataclass
class AdapterSize:
    """A bottleneck adapter's size (``budget.adapter``: Adapter-r; ``budget.parallel_adapter``)."""

    bottleneck: int = MISSING
    scale: float = 1.0
    train_layernorm: bool = False  # also train the backbone's LayerNorms (t5_glue: the Compacter recipe)


@budget_sizes("mam_adapter")
@dataclass
class MAMAdapterSize:
    """He et al.'s MAM adapter: prefix length + parallel FFN adapter (bottleneck, scale)."""

    prefix_length: int = MISSING
    bottleneck: int = MISSING
    scale: float = 4.0


@budget_sizes("compacter")
@dataclass
class CompacterSize:
    bottleneck: int = MISSING
    n: int = 4
    layernorm: bool = False
    train_layernorm: bool = False  # also train the backbone's LayerNorms (t5_glue: the Compacter recipe)

SEQUENTIAL_ATTR = "kpeft_sequential"
PLACEMENTS = ("block_end", "attn_out", "ffn_out", "ffn_parallel")
INITS = ("hf_normal", "lora", "zero_zero")


# ---------------------------------------------------------------- the sequential site
class SequentialHandle:
    """A forward hook ``out ← out + component(out)`` on `module` (the first element of a tuple
    output), and the component's registration under it; :meth:`remove` undoes both."""

    def __init__(self, module: nn.Module, component: Component):
        self.module, self.component = module, component
        self.hook = None

    def _add(self, module: nn.Module, args: tuple, out):
        if isinstance(out, tuple):
            h = out[0]
            return (h + self.component(h).to(h.dtype), *out[1:])
        return out + self.component(out).to(out.dtype)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        remove_child(self.module, SEQUENTIAL_ATTR, self.component)
        self.component.handle = None


def attach_sequential(module: nn.Module, component: Component) -> SequentialHandle:
    """``out ← out + component(out)`` on `module`'s output (before whatever follows it)."""
    add_child(module, SEQUENTIAL_ATTR, component)
    handle = SequentialHandle(module, component)
    handle.hook = module.register_forward_hook(handle._add)
    component.handle = handle
    return handle


def _o_module(layer: Layer) -> nn.Module:
    o = layer.self_attention.o
    return getattr(o.parent, o.attr)  # GPT-2 attn.c_proj, BERT attention.output.dense, ...


def site_module(layer: Layer, placement: str) -> nn.Module:
    """The module whose output a sequential adapter at `placement` rewrites."""
    if placement == "block_end":
        return layer.block
    if placement == "attn_out":
        return _o_module(layer)
    if placement == "ffn_out":
        return layer.ffn_out
    raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")


def _training(ctx: BuildContext) -> bool:
    return bool(getattr(ctx.model, "training", True))


def _ref_weight(layer: Layer) -> torch.Tensor:
    return layer.ffn_out.weight  # device/dtype of the backbone (meta when counting)


# ---------------------------------------------------------------- bottleneck adapter
class Adapter(BlockComponent):
    """``s·(W_up act(Drop? W_down LN_a(h) + b_d) + b_u)`` (row convention ``h W_down``)."""

    sequential: ClassVar[bool] = False

    def __init__(
        self, d: int, bottleneck: int, *, layernorm: bool = True, act: str = "relu", scale: float = 1.0,
        dropout: float = 0.0, init: str = "hf_normal", ref: torch.Tensor | None = None, init_std: float = 0.02,
    ):
        super().__init__(d, d)
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be ≥ 1, not {bottleneck}")
        if init not in INITS:
            raise ValueError(f"adapter init must be one of {', '.join(INITS)}, not {init!r}")
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.bottleneck, self.scaling, self.init = bottleneck, float(scale), init
        self.ln = nn.LayerNorm(d, **kw) if layernorm else None
        self.down = nn.Linear(d, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, d, **kw)
        self.act = ACT2FN[act]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        if self.ln is not None:
            nn.init.ones_(self.ln.weight)
            nn.init.zeros_(self.ln.bias)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if self.init == "hf_normal":  # HF GPT-2 _init_weights on load
            nn.init.normal_(self.down.weight, 0.0, std)
            nn.init.normal_(self.up.weight, 0.0, std)
        elif self.init == "lora":  # down Kaiming-uniform(a=√5), up 0
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.ln is None else self.ln(x)
        return self.up(self.dropout(self.act(self.down(h)))) * self.scaling

    def extra_repr(self) -> str:
        return f"d={self.d_in}, bottleneck={self.bottleneck}, scaling={self.scaling:g}, init={self.init}"


def build_adapters(cfg: DictConfig, ctx: BuildContext) -> list[Adapter]:
    placement = str(cfg.placement)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    std = float(getattr(getattr(ctx.model, "config", None), "initializer_range", 0.02) or 0.02)
    d = ctx.anatomy.hidden_size
    comps = [
        Adapter(
            d, int(cfg.bottleneck), layernorm=bool(cfg.layernorm), act=str(cfg.act), scale=cfg.scale,
            dropout=float(cfg.dropout), init=str(cfg.init), ref=_ref_weight(layer), init_std=std,
        )
        for layer in ctx.anatomy.layers
    ]
    for layer, comp in zip(ctx.anatomy.layers, comps, strict=True):
        comp.train(_training(ctx))  # follow the backbone's mode (its dropout)
        if placement == "ffn_parallel":
            attach_parallel_ffn(layer, comp)
        else:
            attach_sequential(site_module(layer, placement), comp)
    return comps


@register("adapter", AdapterConfig)
def build_adapter(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """One bottleneck adapter per layer at ``cfg.placement``."""
    return build_adapters(cfg, ctx)


# ---------------------------------------------------------------- Compacter (PHM)
class PHMLinear(nn.Module):
    """``y = x W + b``, ``W = Σ_i A_i ⊗ (s_i t_iᵀ)`` (row convention, ``(d_in, d_out)``), computed
    without forming W: x is split into n blocks of d_in/n and contracted factor by factor."""

    def __init__(self, d_in: int, d_out: int, rule: nn.Parameter, rank: int = 1, ref: torch.Tensor | None = None):
        super().__init__()
        n = rule.shape[0]
        if d_in % n or d_out % n:
            raise ValueError(f"PHM n={n} must divide both {d_in} and {d_out}")
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.d_in, self.d_out, self.n, self.rank = d_in, d_out, n, rank
        self.rule = rule  # (n, n, n), shared: the same Parameter in every PHM layer
        self.s = nn.Parameter(torch.empty(n, d_in // n, rank, **kw))
        self.t = nn.Parameter(torch.empty(n, rank, d_out // n, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Glorot-uniform with gain √2 per factor (the phc-gnn initialiser of Compacter and [CODE]).
        for w in (self.s, self.t):
            fan_in, fan_out = w.shape[-2], w.shape[-1]
            bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.bias)

    def B(self) -> torch.Tensor:
        """``B_i = s_i t_iᵀ``, shape ``(n, d_in/n, d_out/n)``."""
        return self.s @ self.t

    def weight(self) -> torch.Tensor:
        """``W = Σ_i A_i ⊗ B_i`` as a dense ``(d_in, d_out)`` matrix (tests, inspection)."""
        return torch.einsum("iab,icd->acbd", self.rule, self.B()).reshape(self.d_in, self.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n = x.shape[:-1], self.n
        X = x.reshape(*lead, n, self.d_in // n)  # X[a, c] = x[a·d_in/n + c]
        u = torch.einsum("...ac,icr->...iar", X, self.s)  # (X s_i)[a]
        v = torch.einsum("...iar,iab->...ibr", u, self.rule)  # Σ_a A_i[a, b] (X s_i)[a]
        y = torch.einsum("...ibr,ird->...bd", v, self.t)  # Σ_i ... t_iᵀ: y[b, d]
        return y.reshape(*lead, self.d_out) + self.bias


class CompacterAdapter(BlockComponent):
    """``h ← h + up(act(down(LN?(h))))`` with PHM down (d→k) and up (k→d) projections."""

    def __init__(
        self, d: int, bottleneck: int, rule: nn.Parameter, *, rank: int = 1, layernorm: bool = False,
        act: str = "gelu_new", ref: torch.Tensor | None = None,
    ):
        super().__init__(d, d)
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.ln = nn.LayerNorm(d, **kw) if layernorm else None
        self.down = PHMLinear(d, bottleneck, rule, rank, ref)
        self.up = PHMLinear(bottleneck, d, rule, rank, ref)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.ln is None else self.ln(x)
        return self.up(self.act(self.down(h)))


def _rule(n: int, std: float, ref: torch.Tensor) -> nn.Parameter:
    rule = nn.Parameter(torch.empty(n, n, n, device=ref.device, dtype=ref.dtype))
    with torch.no_grad():
        nn.init.normal_(rule, 0.0, std)
    return rule


@register("compacter", CompacterConfig)
def build_compacter(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """Compacter: PHM adapters after every attention output and FFN output (Houlsby placement)."""
    if str(cfg.placement) not in ("houlsby", "ffn_out"):
        raise ValueError(f"compacter placement must be houlsby or ffn_out, not {cfg.placement!r}")
    n, d = int(cfg.n), ctx.anatomy.hidden_size
    ref = _ref_weight(ctx.anatomy.layers[0])
    shared = _rule(n, float(cfg.rule_init_std), ref) if cfg.shared_rule else None
    sites = ("attn_out", "ffn_out") if cfg.placement == "houlsby" else ("ffn_out",)
    comps: list[tuple[nn.Module, CompacterAdapter]] = []
    for layer in ctx.anatomy.layers:
        for placement in sites:
            rule = shared if shared is not None else _rule(n, float(cfg.rule_init_std), ref)
            comp = CompacterAdapter(
                d, int(cfg.bottleneck), rule, rank=int(cfg.phm_rank), layernorm=bool(cfg.layernorm),
                act=str(cfg.act), ref=_ref_weight(layer),
            )
            comps.append((site_module(layer, placement), comp))
    for module, comp in comps:
        comp.train(_training(ctx))
        attach_sequential(module, comp)
    return [c for _, c in comps]


__all__ = ["Adapter", "CompacterAdapter", "PHMLinear", "SequentialHandle", "attach_sequential"]
