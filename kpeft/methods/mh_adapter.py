"""Multi-head parallel adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning", §3.3 and Table 1 "MH PA") at the attention site.

The unified view writes prefix-tuning as a per-head modification of the *head attention output*
(He et al. Eq. 5–7: ``head_h ← (1−λ)·head_h + λ·softmax(x W_q^(h) P_k^(h)ᵀ) P_v^(h)``, i.e. an
adapter with ``W_down = W_q^(h) P_k^(h)ᵀ`` and ``W_up = P_v^(h)``). MH PA keeps that multi-head
structure but uses an adapter's functional form and plain addition (Table 1: ReLU, parallel,
"head attn", ``h ← h + Δh``)::

    head_h ← head_h + s·(act(u_h W_down^(h) + b_down^(h)) W_up^(h) + b_up^(h)),   h = 1..H

added to each head's output **before** the heads are merged and W_o is applied (the paper modifies
"head attention outputs as prefix tuning"; the official code adds it to the attention output
before ``out_proj``). ``W_up^(h) ∈ R^{r×p}``, bottleneck ``r`` per head. The input ``u_h``:

* ``input=query`` (default): head h's frozen query projection ``u_h = x W_q^(h) + b_q^(h) ∈ R^p``,
  so ``W_down^(h) ∈ R^{p×r}`` — the paper's point that MH PA "utilises the multi-head projection
  for free": ``W_q^(h) W_down^(h)`` plays the role of prefix-tuning's ``W_q^(h) P_k^(h)ᵀ``, and the
  count per attention module, ``2·H·p·r = 2·d·r``, equals the stored count of a prefix of length
  r. This is He et al.'s official implementation (``attn_option=cross_attn_relu``: the relu'd
  scores of the query against ``P_k``, times ``P_v``, no score scaling). On Llama the query is taken
  before RoPE (a position-free adapter input).
* ``input=hidden``: ``u_h = x`` (the attention sub-layer's input), ``W_down^(h) ∈ R^{d×r}``.

``layernorm=true`` applies a trained LayerNorm to x first (``u_h = LN(x) W_q^(h) + b_q^(h)``), as
the official code does (``ef_transform_layer_norm``; +2d per module). ``bias`` adds
``b_down (H, 1, r)`` and ``b_up (H, 1, p)``. Dropout acts on the bottleneck activations (``null``:
the attention's own dropout probability, as the official code). Init ``lora`` (default): W_down
Kaiming-uniform (a=√5, fan-in = the input width), W_up = 0, biases 0 — Δ = 0 at step 0.

Batched over heads: one batched matmul for the down projection of all heads, one for the up
projection; no loop over heads (or layers) anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from torch import nn
from transformers.activations import ACT2FN

from kpeft.backbones.anatomy import Attention, Projection
from kpeft.methods.attention_site import AttentionCall, AttentionComponent, get_site, use_kpeft_attention
from kpeft.methods.base import Component
from kpeft.methods.block import _first_tensor
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class MHParallelAdapterConfig(ComponentConfig):
    """Multi-head parallel adapter (He et al. Table 1 "MH PA"): per head h,
    ``head_h ← head_h + s·(act(u_h W_down^(h) + b_d) W_up^(h) + b_u)`` before W_o, r per head."""

    kind: str = "mh_parallel_adapter"
    bottleneck: int = MISSING  # r, per head
    scale: float = 1.0  # s
    # query: u_h = head h's frozen query x W_q^(h) + b_q^(h) (pre-RoPE; W_down^(h) p×r: 2·d·r per
    # module, He et al.'s code) | hidden: u_h = x (W_down^(h) d×r)
    input: str = "query"
    layernorm: bool = False  # a trained LayerNorm on x first (the official code's ef_transform_layer_norm)
    bias: bool = False  # b_down (H, r) and b_up (H, p)
    act: str = "relu"  # any transformers ACT2FN name
    dropout: float | None = None  # on the bottleneck; null = the attention's dropout (official code)
    init: str = "lora"  # lora: W_down Kaiming-uniform, W_up 0 | hf_normal: N(0, 0.02) | zero_zero
    attention: str = "self"  # self | cross | all


@budget_sizes("mh_parallel_adapter")
@dataclass
class MHParallelAdapterSize:
    """The multi-head parallel adapter's size: r per head, s, which attention modules, and the
    LayerNorm training of the t5_glue recipe."""

    bottleneck: int = MISSING
    scale: float = 1.0
    attention: str = "self"  # self | cross | all
    train_layernorm: bool = False

INPUTS = ("query", "hidden")
INITS = ("lora", "hf_normal", "zero_zero")


class MultiHeadParallelAdapter(AttentionComponent):
    """The MH PA of one attention module: ``down (H, d_in, r)``, ``up (H, r, p)`` (+ biases, LN)."""

    needs_query_pre_rope = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        d_model: int,
        bottleneck: int,
        *,
        input: str = "query",
        layernorm: bool = False,
        bias: bool = False,
        act: str = "relu",
        scale: float = 1.0,
        dropout: float | None = None,
        init: str = "lora",
        init_std: float = 0.02,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"mh_parallel_adapter bottleneck must be >= 1, not {bottleneck}")
        if input not in INPUTS:
            raise ValueError(f"mh_parallel_adapter input must be one of {', '.join(INPUTS)}, not {input!r}")
        if init not in INITS:
            raise ValueError(f"mh_parallel_adapter init must be one of {', '.join(INITS)}, not {init!r}")
        if act not in ACT2FN:
            raise ValueError(f"mh_parallel_adapter act {act!r} is not a transformers activation (e.g. relu, gelu)")
        kw = {"device": device, "dtype": dtype}
        H, p, r = num_heads, head_dim, bottleneck
        self.num_heads, self.head_dim, self.d_model, self.bottleneck = H, p, d_model, r
        self.input, self.act_name, self.act = input, act, ACT2FN[act]
        self.scaling, self.dropout, self.init = float(scale), dropout, init
        self.d_in = p if input == "query" else d_model
        self.ln = nn.LayerNorm(d_model, **kw) if layernorm else None
        self.down = nn.Parameter(torch.empty(H, self.d_in, r, **kw))
        self.up = nn.Parameter(torch.empty(H, r, p, **kw))
        self.down_bias = nn.Parameter(torch.empty(H, 1, r, **kw)) if bias else None
        self.up_bias = nn.Parameter(torch.empty(H, 1, p, **kw)) if bias else None
        self.reset_parameters(init_std)
        # Set by the builder: the frozen q projection (query input) and whether x is captured.
        self.q_projection: Projection | None = None
        self.needs_x = layernorm or input == "hidden"
        self._x: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for b in (self.down_bias, self.up_bias):
            if b is not None:
                nn.init.zeros_(b)
        if self.init == "lora":  # kaiming_uniform_(a=√5) on each head's (d_in → r) map: bound 1/√d_in
            bound = 1.0 / math.sqrt(self.d_in)
            nn.init.uniform_(self.down, -bound, bound)
            nn.init.zeros_(self.up)
        elif self.init == "hf_normal":
            nn.init.normal_(self.down, 0.0, std)
            nn.init.normal_(self.up, 0.0, std)
        else:
            nn.init.zeros_(self.down)
            nn.init.zeros_(self.up)

    # ------------------------------------------------------------ the input u
    def capture_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the attention module: keep its input x for this call."""
        self._x = _first_tensor(args, kwargs)

    def adapter_input(self, call: AttentionCall) -> torch.Tensor:
        """``u`` as ``(B, H, n, p)`` (query input) or ``(B, 1, n, d)`` (hidden input, shared by heads)."""
        if not self.needs_x:
            return call.query_pre  # x W_q + b_q per head (pre-RoPE on Llama), unscaled
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError("mh_parallel_adapter: the attention module's input was not captured")
        if self.ln is not None:
            x = self.ln(x)
        if self.input == "hidden":
            return x.unsqueeze(1)
        proj = self.q_projection
        q = x @ proj.weight().to(x.dtype)  # the frozen W_q (row convention), LoRA branches excluded
        if proj.bias() is not None:
            q = q + proj.bias().to(x.dtype)
        b, n = q.shape[:2]
        return q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    # ------------------------------------------------------------ Δ, batched over heads
    def delta(self, u: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """``s·(act(u_h W_down^(h) + b_down^(h)) W_up^(h) + b_up^(h))`` for all heads, ``(B, H, n, p)``."""
        hidden = torch.matmul(u, self.down.to(u.dtype))  # (B, H, n, r): one batched matmul over heads
        if self.down_bias is not None:
            hidden = hidden + self.down_bias
        hidden = F.dropout(self.act(hidden), p=dropout, training=self.training and dropout > 0)
        out = torch.matmul(hidden, self.up.to(hidden.dtype))  # (B, H, n, p)
        if self.up_bias is not None:
            out = out + self.up_bias
        return out * self.scaling

    def transform_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        p = call.dropout if self.dropout is None else float(self.dropout)
        return out + self.delta(self.adapter_input(call), p).to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, bottleneck={self.bottleneck}, input={self.input}, "
            f"layernorm={self.ln is not None}, bias={self.up_bias is not None}, act={self.act_name}, "
            f"scaling={self.scaling:g}"
        )


def mh_adapter_params(H: int, p: int, d: int, r: int, *, input: str = "query", bias: bool = False,
                      layernorm: bool = False) -> int:
    """Parameters of one attention module's MH PA: ``H·(d_in·r + r·p)`` (d_in = p for the query
    input: ``2·H·p·r``), + ``H·(r + p)`` biases, + ``2d`` LayerNorm."""
    d_in = p if input == "query" else d
    return H * (d_in * r + r * p) + (H * (r + p) if bias else 0) + (2 * d if layernorm else 0)


def attach_mh_adapter(att: Attention, adapter: MultiHeadParallelAdapter) -> None:
    """Install `adapter` at `att`'s site (with the pre-RoPE query tap on rotary backbones, and a
    pre-hook capturing the sub-layer input where the adapter reads x)."""
    site = get_site(att)
    site.components.append(adapter)
    adapter.q_projection = att.q
    if adapter.needs_x:
        att.module.register_forward_pre_hook(adapter.capture_input, with_kwargs=True)
    elif adapter.input == "query":
        site.install_query_tap(att)


@register("mh_parallel_adapter", MHParallelAdapterConfig)
def build_mh_parallel_adapter(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """A :class:`MultiHeadParallelAdapter` on every ``cfg.attention`` module."""
    use_kpeft_attention(ctx.model)
    std = float(getattr(getattr(ctx.model, "config", None), "initializer_range", 0.02) or 0.02)
    comps: list[MultiHeadParallelAdapter] = []
    for _, att in ctx.anatomy.attentions(cfg.attention):
        ref = att.o.module.weight  # device/dtype of the backbone (meta when counting)
        adapter = MultiHeadParallelAdapter(
            att.num_heads, att.head_dim, ctx.anatomy.hidden_size, int(cfg.bottleneck),
            input=str(cfg.input), layernorm=bool(cfg.layernorm), bias=bool(cfg.bias), act=str(cfg.act),
            scale=float(cfg.scale), dropout=None if cfg.dropout is None else float(cfg.dropout),
            init=str(cfg.init), init_std=std, device=ref.device, dtype=ref.dtype,
        )
        adapter.train(bool(getattr(ctx.model, "training", True)))
        attach_mh_adapter(att, adapter)
        comps.append(adapter)
    if not comps:
        raise ValueError(f"no {cfg.attention} attention modules for mh_parallel_adapter")
    return list(comps)


__all__ = ["MultiHeadParallelAdapter", "attach_mh_adapter", "mh_adapter_params"]
