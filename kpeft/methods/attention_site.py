"""The attention site: components that act *inside* the per-head softmax attention of a layer
(docs/architecture.md) — prefix-tuning's extra keys/values, inducer-tuning's per-query
inducer term.

**How it plugs into transformers (5.x), without forking modeling code.** Every supported family
(GPT-2, BERT/RoBERTa, T5, Llama) computes q/k/v (RoPE and the KV cache included) and then calls a
pluggable attention function ``fn(module, query, key, value, attention_mask, scaling, dropout,
**kwargs)`` with ``(batch, heads, length, head_dim)`` tensors (transformers 5.x). kpeft registers

* :func:`kpeft_attention` with ``transformers.AttentionInterface`` under the name ``"kpeft"``, and
* transformers' **eager** mask builder with ``AttentionMaskInterface`` under the same name (an
  attention function registered alone receives no padding mask; the eager mask is the additive
  ``(B, 1, n, N)`` float mask with causality and padding, materialised even without padding for
  causal layers),

and a method with attention-site components switches the model to it
(``model.set_attn_implementation("kpeft")``). The function receives the attention module, so the
components find themselves on it: an :class:`AttentionSite` installed as the submodule
``<attention module>.kpeft_site`` holds them (so their parameters are the model's parameters).
**Modules without a site fall back to their family's own eager function**, so a model switched to
``"kpeft"`` computes exactly what ``attn_implementation="eager"`` computes (bit for bit; tested).

**The per-module hook protocol** (:class:`AttentionComponent`), on one :class:`AttentionCall`:

1. ``extend_kv(call)`` — may prepend keys/values (prefix-tuning), extending the additive mask and
   T5's relative ``position_bias`` with zeros for the new (never masked) columns;
2. the site computes, like the eager functions, ``S = scaling·Q Kᵀ (+ position_bias) + mask``
   (GQA keys repeated as Llama's eager code does), ``P = softmax(S)`` (float32), attention dropout,
   ``f = P V``; ``call.logits`` (unmasked) and ``call.scores`` (= S, masked) are kept for step 3;
3. ``transform_output(call, f)`` — may change the per-head output ``f (B, H, n, p)`` before the
   heads are merged and W_o is applied (the inducer).

When no component of a site reads ``call.logits`` / ``call.scores`` (``needs_scores = False``:
prefix-tuning), step 2 is ``torch.nn.functional.scaled_dot_product_attention`` on the same
extended keys, values and additive mask (+ position bias): the same function up to float
rounding, without materialising the attention probabilities for backward (the fused kernels on
GPU); the attention weights returned to transformers are then ``None``, as with
``attn_implementation="sdpa"``.

Components that need the **pre-RoPE query** (the inducer on Llama: docs/methods.md) get it as
``call.query_pre``: on rotary backbones the site taps the q projection's output (a forward hook on
the q projection, wrapped once in :class:`~kpeft.methods.base.AdaptedProjection` so that a LoRA
branch on W_q is included in what the tap sees, whatever order the components are built in).
Elsewhere ``query_pre`` is the query the function receives.

Nothing here loops over heads or layers: the model's own layer loop calls the function once per
attention module, and every tensor op is batched over heads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kpeft.backbones.anatomy import Attention
from kpeft.methods.base import AdaptedProjection, Component

ATTN_IMPLEMENTATION = "kpeft"
SITE_ATTR = "kpeft_site"


# ---------------------------------------------------------------- the call and the components
@dataclass
class AttentionCall:
    """One call of the attention function on one module: inputs, and what the site computed."""

    module: nn.Module
    query: torch.Tensor  # (B, H, n, p), after RoPE on rotary backbones
    key: torch.Tensor  # (B, H_kv, N, p) — cache included; prefix rows once extended
    value: torch.Tensor
    mask: torch.Tensor | None  # additive (B|1, 1|H, n, N) float mask, or None (nothing masked)
    scaling: float
    dropout: float  # attention dropout probability (0 in eval)
    causal: bool
    query_pre: torch.Tensor  # (B, H, n, p): the query before RoPE (= query elsewhere)
    position_bias: torch.Tensor | None = None  # T5's relative bias, added to S only
    n_prefix: int = 0  # key columns prepended by extend_kv (never masked, no position)
    n_keys: int = 0  # real key columns (cache + current), before any prefix
    logits: torch.Tensor | None = None  # scaling·QKᵀ (+ position bias), no mask — after step 2
    scores: torch.Tensor | None = None  # S: logits + mask (what the softmax saw)
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def training(self) -> bool:
        return self.module.training

    def causal_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive causal mask ``(n, n_prefix + n_keys)`` of this call: query i (absolute
        position ``n_keys − n + i``) sees real keys up to itself and every prefix column."""
        n, device = self.query.shape[-2], self.query.device
        q_pos = torch.arange(n, device=device)[:, None] + (self.n_keys - n)
        k_pos = torch.arange(self.n_keys, device=device)[None, :]
        visible = torch.cat([torch.ones(n, self.n_prefix, dtype=torch.bool, device=device), k_pos <= q_pos], 1)
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The additive mask S gets: the function's mask, or the causal mask where transformers
        skipped it (an sdpa-style causal call with no padding); None when nothing is masked."""
        if self.mask is None and self.causal and self.query.shape[-2] > 1:
            return self.causal_mask(dtype)
        return self.mask

    def query_positions(self) -> torch.Tensor:
        """Absolute 0-based positions ``(n,)`` of the queries (self-attention: past + index)."""
        n = self.query.shape[-2]
        return torch.arange(n, device=self.query.device) + max(self.n_keys - n, 0)


class AttentionComponent(Component):
    """A component at the attention site (see the module docstring for the protocol). Components
    that live elsewhere in the model (a prefix shared by all layers) take part through a
    parameter-free per-layer object with the same two methods."""

    site: ClassVar[str] = "attention"
    mergeable: ClassVar[bool] = False
    needs_query_pre_rope: ClassVar[bool] = False
    # Whether transform_output reads call.logits / call.scores; a site whose components all say no
    # runs the fused ``scaled_dot_product_attention`` (no (n × N) score tensor kept for backward).
    needs_scores: ClassVar[bool] = True

    def extend_kv(self, call: AttentionCall) -> None:
        """Prepend keys/values (and mask/bias columns) to ``call``; default: nothing."""

    def transform_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """The per-head output ``(B, H, n, p)`` after this component; default: unchanged."""
        return out


# ---------------------------------------------------------------- the site
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, N, p) → (B, H_kv·n_rep, N, p), each KV head repeated for its query group (as
    the Llama eager code does, so the site reproduces it bit for bit)."""
    if n_rep == 1:
        return x
    b, h, n, p = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, p).reshape(b, h * n_rep, n, p)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean "may attend" mask as an additive one; float masks pass through."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class AttentionSite(nn.Module):
    """The components attached to one attention module, installed as ``module.kpeft_site``.

    ``components`` run in order: all ``extend_kv`` before the scores, all ``transform_output``
    after ``f = softmax(S) V``. Parameter-owning components are submodules here; the per-layer
    handles of a shared component (prefix) are parameter-free submodules that point to it.
    """

    def __init__(self, att: Attention):
        super().__init__()
        self.components = nn.ModuleList()
        self.causal = att.causal
        self.rotary = att.rotary
        self.num_heads = att.num_heads
        self.num_kv_heads = att.num_kv_heads
        self.head_dim = att.head_dim
        self.tap_installed = False
        self._query_pre: torch.Tensor | None = None
        self._q_block: tuple[int, int] | None = None  # q's columns in a fused qkv output (Phi-3)

    # ------------------------------------------------------------ pre-RoPE query tap
    def install_query_tap(self, att: Attention) -> None:
        """On rotary backbones, capture the q projection's output (pre-RoPE, LoRA included)."""
        if self.tap_installed or not self.rotary:
            return
        proj = att.q
        wrapper = getattr(proj.parent, proj.attr)
        if not isinstance(wrapper, AdaptedProjection):  # later weight branches join this wrapper
            wrapper = AdaptedProjection(wrapper)
            setattr(proj.parent, proj.attr, wrapper)
        self._q_block = proj.out_slice  # Phi-3's fused qkv_proj: keep q's block of the output
        wrapper.register_forward_hook(self._capture_query)  # a bound method: survives deepcopy
        self.tap_installed = True

    def _capture_query(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        block = getattr(self, "_q_block", None)
        self._query_pre = output if block is None else output[..., block[0] : block[1]]

    def _take_query_pre(self, query: torch.Tensor) -> torch.Tensor:
        if not self.tap_installed:
            return query
        stashed, self._query_pre = self._query_pre, None
        if stashed is None:
            raise RuntimeError("kpeft attention site: the q projection's output was not captured before attention")
        b, _, n, p = query.shape
        return stashed.view(b, n, -1, p).transpose(1, 2)

    # ------------------------------------------------------------ the attention
    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        dropout: float,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        position_bias = kwargs.pop("position_bias", None)
        call = AttentionCall(
            module=module, query=query, key=key, value=value,
            mask=additive_mask(attention_mask, query.dtype),
            scaling=query.size(-1) ** -0.5 if scaling is None else scaling,
            dropout=dropout, causal=self.causal, query_pre=self._take_query_pre(query),
            position_bias=position_bias, n_keys=key.shape[-2], kwargs=kwargs,
        )
        for comp in self.components:
            comp.extend_kv(call)
        n_rep = query.shape[1] // call.key.shape[1]
        keys, values = repeat_kv(call.key, n_rep), repeat_kv(call.value, n_rep)
        if not any(getattr(comp, "needs_scores", True) for comp in self.components):
            out = self._fused(call, keys, values)
            for comp in self.components:
                out = comp.transform_output(call, out)
            return out.transpose(1, 2).contiguous(), None
        logits = torch.matmul(query, keys.transpose(2, 3)) * call.scaling
        if call.position_bias is not None:
            logits = logits + call.position_bias
        mask = call.attention_mask(logits.dtype)
        scores = logits + mask if mask is not None else logits
        # At least float32 (fp16/bf16 upcast), never less than the scores' own precision: a float64
        # row that is fully masked (a left pad) must not turn into -inf everywhere (NaN).
        probs = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
        dropped = F.dropout(probs, p=call.dropout, training=module.training)
        out = torch.matmul(dropped, values)  # (B, H, n, p)
        call.logits, call.scores = logits, scores
        for comp in self.components:
            out = comp.transform_output(call, out)
        return out.transpose(1, 2).contiguous(), probs

    @staticmethod
    def _fused(call: AttentionCall, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``softmax(S) V`` by ``scaled_dot_product_attention``: S's mask and position bias as one
        additive float mask."""
        dtype = call.query.dtype
        mask = call.attention_mask(dtype)
        if call.position_bias is not None:
            mask = call.position_bias if mask is None else mask + call.position_bias
        if mask is not None:
            mask = mask.to(dtype)
        p = call.dropout if call.training else 0.0
        return F.scaled_dot_product_attention(call.query, keys, values, attn_mask=mask, dropout_p=p, scale=call.scaling)


def get_site(att: Attention) -> AttentionSite:
    """The site of `att`'s module, created (and registered as a submodule) on first use."""
    site = att.module._modules.get(SITE_ATTR)
    if site is None:
        site = AttentionSite(att)
        att.module.add_module(SITE_ATTR, site)
    return site


# ---------------------------------------------------------------- the registered function
_EAGER: dict[type, Any] = {}


def _eager_function(module: nn.Module):
    """The family's own eager attention function (``eager_attention_forward`` of the module's
    modeling file), or None."""
    cls = type(module)
    if cls not in _EAGER:
        _EAGER[cls] = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
    return _EAGER[cls]


def kpeft_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention function registered as ``"kpeft"``: the module's site if it has components,
    else the family's eager attention (identical to ``attn_implementation="eager"``)."""
    site = module._modules.get(SITE_ATTR)
    if site is None or len(site.components) == 0:
        eager = _eager_function(module)
        if eager is not None:
            return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        site = _EMPTY_SITE
    return site.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


class _GenericSite(AttentionSite):
    """A component-free site for modules whose family has no eager function (causality from the
    module's ``is_causal``)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.components = nn.ModuleList()
        self.causal, self.rotary, self.tap_installed, self._query_pre = False, False, False, None
        self._q_block = None

    def attend(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        self.causal = bool(getattr(module, "is_causal", False))
        return super().attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


_EMPTY_SITE = _GenericSite()


def register_attention() -> None:
    """Register the attention function and its (eager) mask builder (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kpeft_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


def use_kpeft_attention(model: nn.Module | None) -> None:
    """Switch `model` (every sub-model, T5's stacks included) to the ``"kpeft"`` attention."""
    if model is None:
        raise ValueError("attention-site components need the model (BuildContext.model)")
    register_attention()
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # transformers only warns
        raise ValueError(f"{type(model).__name__} does not take a pluggable attention function (AttentionInterface)")


register_attention()
