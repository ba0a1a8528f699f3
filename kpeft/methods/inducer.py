"""Inducer-tuning (Chen, Hazarika et al., EMNLP 2022; [IT] §4) at the attention site.

Prefix-tuning with one private "inducer" key/value pair per query, in residual form. Per head,
query row ``Q_i`` (pre-RoPE on Llama), ordinary masked logits ``S_i·`` (causal + padding, T5's
relative bias included, GQA keys shared):

    P_k,i = Q_i + MLP_k(Q_i)                (MLP_k absent when r_k < 2: P_k = Q)
    a_i   = ⟨Q_i, P_k,i⟩ · scaling           (never masked; T5: scaling = 1)
    λ_i   = exp(a_i) / (exp(a_i) + Σ_j exp(S_ij)) = sigmoid(a_i − LSE_j S_ij)
    f_i   = softmax(S_i·) V                  (the ordinary attention output, computed as usual)

Prepending ``(P_k,i, P_v,i = f_i + MLP_v(Q_i))`` for query i alone gives (Eq. 7–8)
``λ_i P_v,i + (1 − λ_i) f_i = f_i + λ_i MLP_v(Q_i)``; no cache rows are added.

Value branches (``value``):

* ``extended`` (Eq. 9–11, the final model): ``MLP̄_v^(h)(q) = tanh(q W1^(h) + b1^(h)) W2^(h)`` maps
  a head's query to model width, ``W1 (H,p,r_v)``, ``b1 (H,1,r_v)``, ``W2 (H,r_v,d)``; the
  sub-layer output is ``f̄ + Σ_h λ_h·tanh(Q_h W1_h + b1_h) W2_h + b2`` with ``f̄ = W_o(merged f)``
  (b_o included) and the shared ``b2 (d)`` added once, unweighted (the official code). The
  λ-weighted hidden ``U' (B,H,n,r_v)`` is computed here and handed to a parameter-free branch on
  the **W_o projection** (:class:`InducerValueBranch`, installed in its
  :class:`~kpeft.methods.base.AdaptedProjection`), which adds ``Σ_h U'_h W2_h + b2`` to W_o's
  output — an explicit coupling: the attention function stores ``U'`` on the component, the
  W_o branch (called next, in the same module forward) takes it.
* ``local`` (the "Adaptive" ablation): ``MLP_v^(h)`` of width p (``W2 (H,r_v,p)``,
  ``b2 (H,1,p)``), ``f + λ·MLP_v(Q)`` per head before W_o.

``gating=true`` (Table 3 "Gating"): ``(1−λ)·f + λ·MLP_v`` — the head outputs are scaled by
``(1−λ)`` before W_o, so b_o is not scaled (the official code's renormalised tail).

Activation tanh (official code), every tensor ``trunc_normal_0.01``: at init ``P_k ≈ Q`` and the
value term ≈ 0. λ gets the attention dropout in training (independent mask, official code).
Per layer: ``MLP_k(r) = H·r·(2p+1) + d``, ``MLP̄_v(r) = H·r·(p+1+d) + d``, ``MLP_v(r) = H·r·(2p+1) + d``
(GPT-2: 1548r + 768, 9996r + 768, 1548r + 768).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from torch import nn

from kpeft.backbones.anatomy import Attention, Projection
from kpeft.methods.attention_site import AttentionCall, AttentionComponent, get_site, use_kpeft_attention
from kpeft.methods.base import WeightComponent, attach_weight_component, trunc_normal_001_
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class InducerConfig(ComponentConfig):
    """Inducer-tuning ([IT] §4): per query an inducer key P_k = Q + MLP_k(Q) (no MLP_k when
    r_k < 2), λ = sigmoid(a − LSE(S)), output f + λ·MLP_v(Q); variants by `value` and `gating`."""

    kind: str = "inducer"
    r_k: int = MISSING  # MLP_k bottleneck ("prefix_length" in the official code)
    r_v: int = MISSING  # value-MLP bottleneck ("prefix_dim")
    # extended: MLP̄_v (Eq. 11) to model width, added after W_o | local: MLP_v per head (width p),
    # added to the head output before W_o (the "Adaptive" ablation).
    value: str = "extended"
    gating: bool = False  # (1−λ)·f + λ·MLP_v instead of the residual f + λ·MLP_v (Table 3)
    act: str = "tanh"  # tanh (official code) | relu | gelu
    # houlsby: trunc_normal_0.01 on every tensor (official code) | zero_value: MLP_v ≡ 0 (tests)
    init: str = "houlsby"
    lambda_dropout: bool = True  # the attention dropout also drops λ (official code), training only
    # a_i ← a_i·√i (1-based position): the official code's undocumented switch for r_k = 0;
    # null = on exactly when fidelity=code and r_k = 0.
    position_scaled_logit: bool | None = None
    # λ's normaliser sees the padding mask (paper); null = true, false under fidelity=code
    # (the NLU code computes λ before adding the padding mask, docs/deviations.md, item 9).
    mask_padding_in_lambda: bool | None = None
    attention: str = "self"  # self | cross | all


@budget_sizes("inducer", "inducer_adaptive", "inducer_extension")
@dataclass
class InducerSize:
    """Inducer-tuning ([IT] Table 5): MLP_k and value-MLP bottlenecks."""

    r_k: int = MISSING
    r_v: int = MISSING


@budget_sizes("inducer_lora")
@dataclass
class InducerLoRASize:
    """Inducer-tuning + LoRA on W_q ([IT] Table 5); the NLU code's LoRA has no bias β."""

    r_k: int = MISSING
    r_v: int = MISSING
    lora_r: int = MISSING
    lora_bias: str = "auto"  # LoRA train_bias: auto | true | false


@budget_sizes("mam_inducer")
@dataclass
class MAMInducerSize(InducerLoRASize):
    """MAM inducer-tuning ([IT] Table 5): inducer + LoRA on W_q (the fields above) + FFN adapter."""

    bottleneck: int = MISSING
    scale: float = 1.0
    layernorm: bool = False  # the FFN adapter's own LN (the code trains it: 1.62%; paper 1.61% without)
    init: str = "hf_normal"  # hf_normal (GPT-2 code) | lora (NLU code)

ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}
VALUE_KINDS = ("extended", "local")


def inducer_lambda(a: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``λ = sigmoid(a − LSE(S))`` = the first column of ``softmax([a; S])`` (at least float32).

    `a` ``(..., n)``, `scores` ``(..., n, N)`` (masked entries at the dtype's minimum)."""
    dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 stays float64 (fully masked rows)
    return torch.sigmoid(a.to(dtype) - torch.logsumexp(scores.to(dtype), dim=-1))


class Inducer(AttentionComponent):
    """The inducer of one attention module (all heads batched)."""

    needs_query_pre_rope = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        d_model: int,
        r_k: int,
        r_v: int,
        value: str = "extended",
        gating: bool = False,
        act: str = "tanh",
        init: str = "houlsby",
        lambda_dropout: bool = True,
        position_scaled_logit: bool = False,
        mask_padding_in_lambda: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if value not in VALUE_KINDS:
            raise ValueError(f"inducer value must be one of {', '.join(VALUE_KINDS)}, not {value!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"inducer act must be one of {', '.join(ACTIVATIONS)}, not {act!r}")
        if init not in ("houlsby", "zero_value"):
            raise ValueError(f"inducer init must be houlsby or zero_value, not {init!r}")
        if r_v < 1:
            raise ValueError(f"inducer r_v must be >= 1, got {r_v}")
        if r_k < 0:
            raise ValueError(f"inducer r_k must be >= 0, got {r_k}")
        H, p, d = num_heads, head_dim, d_model
        kw = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.d_model = H, p, d
        self.r_k, self.r_v, self.value, self.gating = r_k, r_v, value, gating
        self.act_name, self.act = act, ACTIVATIONS[act]
        self.lambda_dropout = lambda_dropout
        self.position_scaled_logit = position_scaled_logit
        self.mask_padding_in_lambda = mask_padding_in_lambda
        if r_k >= 2:  # "prefix_length < 2 means P_k = Q" (official code)
            self.k_w1 = nn.Parameter(torch.empty(H, p, r_k, **kw))
            self.k_b1 = nn.Parameter(torch.empty(H, 1, r_k, **kw))
            self.k_w2 = nn.Parameter(torch.empty(H, r_k, p, **kw))
            self.k_b2 = nn.Parameter(torch.empty(H, 1, p, **kw))
        else:
            self.k_w1 = self.k_b1 = self.k_w2 = self.k_b2 = None
        width = d if value == "extended" else p
        self.v_w1 = nn.Parameter(torch.empty(H, p, r_v, **kw))
        self.v_b1 = nn.Parameter(torch.empty(H, 1, r_v, **kw))
        self.v_w2 = nn.Parameter(torch.empty(H, r_v, width, **kw))
        self.v_b2 = nn.Parameter(torch.empty(d, **kw) if value == "extended" else torch.empty(H, 1, p, **kw))
        for t in self.parameters():
            trunc_normal_001_(t)
        if init == "zero_value":  # MLP_v ≡ 0 (tests: the frozen model exactly, λ irrelevant)
            with torch.no_grad():
                self.v_w2.zero_()
                self.v_b2.zero_()
        self._pending: torch.Tensor | None = None  # Σ_h U'_h W2_h + b2 for the W_o branch

    # ------------------------------------------------------------ pieces (batched over heads)
    def inducer_key(self, q: torch.Tensor) -> torch.Tensor:
        """``P_k = Q + MLP_k(Q)``, ``(B, H, n, p)``."""
        if self.k_w1 is None:
            return q
        hidden = self.act(torch.einsum("bhnp,hpr->bhnr", q, self.k_w1) + self.k_b1)
        return q + torch.einsum("bhnr,hrp->bhnp", hidden, self.k_w2) + self.k_b2

    def value_hidden(self, q: torch.Tensor) -> torch.Tensor:
        """``σ(Q W1 + b1)``, ``(B, H, n, r_v)``."""
        return self.act(torch.einsum("bhnp,hpr->bhnr", q, self.v_w1) + self.v_b1)

    def logit(self, call: AttentionCall) -> torch.Tensor:
        """``a = ⟨Q, P_k⟩·scaling`` ``(B, H, n)`` (× √position with the code's r_k = 0 switch)."""
        q = call.query_pre
        a = (q * self.inducer_key(q)).sum(-1) * call.scaling
        if self.position_scaled_logit:
            a = a * (call.query_positions() + 1).to(a.dtype).sqrt()
        return a

    def lambda_scores(self, call: AttentionCall) -> torch.Tensor:
        """The logits λ's normaliser runs over: S (paper), or without the padding mask (the NLU
        code; encoder attention only — a causal layer keeps its causal mask)."""
        if self.mask_padding_in_lambda or call.mask is None:
            return call.scores
        if call.causal:
            return call.logits + call.causal_mask(call.logits.dtype)
        return call.logits

    def lam(self, call: AttentionCall) -> torch.Tensor:
        """λ ``(B, H, n)``, in the query's dtype."""
        return inducer_lambda(self.logit(call), self.lambda_scores(call)).to(call.query.dtype)

    # ------------------------------------------------------------ the site protocol
    def transform_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        lam = self.lam(call)  # (B, H, n)
        weight = lam
        if self.lambda_dropout and call.dropout > 0:
            weight = F.dropout(lam, p=call.dropout, training=call.training)
        u = self.value_hidden(call.query_pre) * weight[..., None]  # U' = λ ⊙ σ(Q W1 + b1)
        if self.gating:
            out = out * (1 - lam)[..., None]
        if self.value == "local":
            # λ·MLP_v(Q) per head, bias inside the λ weighting
            return out + torch.einsum("bhnr,hrp->bhnp", u, self.v_w2) + weight[..., None] * self.v_b2
        self._pending = torch.einsum("bhnr,hrd->bnd", u, self.v_w2) + self.v_b2
        return out

    def take_value_output(self) -> torch.Tensor:
        """``Σ_h U'_h W2_h + b2`` ``(B, n, d)`` of the attention call just made (once)."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("inducer value branch: W_o ran without an attention call before it")
        return pending

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, r_k={self.r_k}, r_v={self.r_v}, "
            f"value={self.value}, gating={self.gating}, act={self.act_name}"
        )


class InducerValueBranch(WeightComponent):
    """The extended value term on W_o: adds what the inducer left for it (no parameters of its
    own; not mergeable — it depends on λ and the query, not on W_o's input)."""

    mergeable = False

    def __init__(self, projection: Projection, inducer: Inducer):
        super().__init__(projection)
        object.__setattr__(self, "inducer", inducer)  # not a submodule: it lives at the site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inducer.take_value_output()
        if out.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"inducer value branch: shape {tuple(out.shape)} does not fit W_o's input {tuple(x.shape)}")
        return out

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError("the inducer's value branch has no weight delta (not mergeable)")


def attach_inducer(att: Attention, inducer: Inducer) -> None:
    """Install `inducer` at `att`'s site (with the pre-RoPE tap on rotary backbones) and, for the
    extended value, its branch on W_o."""
    site = get_site(att)
    site.components.append(inducer)
    site.install_query_tap(att)
    if inducer.value == "extended":
        attach_weight_component(InducerValueBranch(att.o, inducer))


@register("inducer", InducerConfig)
def build_inducer(cfg: DictConfig, ctx: BuildContext) -> list[Inducer]:
    """An :class:`Inducer` on every ``cfg.attention`` module."""
    use_kpeft_attention(ctx.model)
    code = ctx.fidelity == "code"
    scaled = cfg.position_scaled_logit
    comps: list[Inducer] = []
    for _, att in ctx.anatomy.attentions(cfg.attention):
        if att.o.d_in != att.num_heads * att.head_dim:  # pragma: no cover - all families fit
            raise ValueError("inducer: W_o's input is not heads × head size")
        mask_padding = cfg.mask_padding_in_lambda
        ref = att.o.module.weight
        inducer = Inducer(
            att.num_heads, att.head_dim, att.o.d_out, cfg.r_k, cfg.r_v,
            value=cfg.value, gating=cfg.gating, act=cfg.act, init=cfg.init,
            lambda_dropout=cfg.lambda_dropout,
            position_scaled_logit=(code and cfg.r_k == 0) if scaled is None else bool(scaled),
            # the NLU code's λ ignores padding (docs/deviations.md, item 9): encoder attention, fidelity=code
            mask_padding_in_lambda=(not (code and not att.causal)) if mask_padding is None else bool(mask_padding),
            device=ref.device, dtype=ref.dtype,
        )
        attach_inducer(att, inducer)
        comps.append(inducer)
    return comps


def inducer_params_per_layer(H: int, p: int, d: int, r_k: int, r_v: int, value: str = "extended") -> int:
    """Parameters of one inducer ([IT] Table 5 formulas)."""
    k = H * r_k * (2 * p + 1) + H * p if r_k >= 2 else 0
    v = H * r_v * (p + 1 + d) + d if value == "extended" else H * r_v * (2 * p + 1) + H * p
    return k + v


__all__ = ["Inducer", "InducerValueBranch", "inducer_lambda", "inducer_params_per_layer"]
