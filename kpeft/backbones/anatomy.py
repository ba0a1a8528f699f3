"""A backbone described by what PEFT methods need, independent of the family's module names.

Methods never reach into ``model.transformer.h[i].attn.c_attn``; they ask the anatomy for
"the q projection of layer i" and get a :class:`Projection`: a handle that knows where the
weight lives, how it is stored (GPT-2 ``Conv1D`` = row convention ``(d_in, d_out)``;
``nn.Linear`` = ``(d_out, d_in)``), and which output columns belong to it (GPT-2's fused
``c_attn`` is sliced into q/k/v column blocks, docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Layout = Literal["conv1d", "linear"]
PROJECTION_NAMES = ("q", "k", "v", "o")


@dataclass
class Projection:
    """One of q/k/v/o, in the papers' row convention ``Y = X W + b`` with ``W ∈ R^{d_in×d_out}``."""

    parent: nn.Module  # the module holding the projection as attribute `attr`
    attr: str
    layout: Layout
    d_in: int
    d_out: int
    out_slice: tuple[int, int] | None = None  # column block inside a fused projection

    @property
    def module(self) -> nn.Module:
        """The frozen base module (looks through a kpeft wrapper if one is installed)."""
        mod = getattr(self.parent, self.attr)
        return getattr(mod, "base", mod)

    @property
    def start(self) -> int:
        return 0 if self.out_slice is None else self.out_slice[0]

    @property
    def stop(self) -> int:
        return self.d_out if self.out_slice is None else self.out_slice[1]

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    def weight(self) -> torch.Tensor:
        """The weight block in row convention ``(d_in, d_out)`` (a view, not a copy)."""
        w = self.module.weight
        if self.layout == "conv1d":
            return w[:, self.start : self.stop]
        return w[self.start : self.stop].t()

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return None if b is None else b[self.start : self.stop]

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor, delta_bias: torch.Tensor | None = None) -> None:
        """``W += delta`` (row convention) and ``b += delta_bias``, in place (merge/unmerge)."""
        mod = self.module
        if delta_bias is not None and not self.has_bias:  # checked before anything changes
            raise ValueError(
                f"cannot merge a bias delta into {type(mod).__name__} without a bias; "
                "set the component's train_bias=false for bias-free backbones"
            )
        if self.layout == "conv1d":
            mod.weight[:, self.start : self.stop] += delta.to(mod.weight.dtype)
        else:
            mod.weight[self.start : self.stop] += delta.t().to(mod.weight.dtype)
        if delta_bias is not None:
            mod.bias[self.start : self.stop] += delta_bias.to(mod.bias.dtype)


@dataclass
class Attention:
    """One attention module of a layer."""

    module: nn.Module
    kind: Literal["self", "cross"]
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaled: bool = True  # scores divided by sqrt(head_dim) (T5: no)
    causal: bool = False
    rotary: bool = False  # RoPE applied to q, k (Llama)

    def projection(self, name: str) -> Projection:
        if name not in PROJECTION_NAMES:
            raise ValueError(f"unknown projection {name!r}; valid: {', '.join(PROJECTION_NAMES)}")
        return getattr(self, name)


@dataclass
class Layer:
    """One transformer block: its attention modules (self first) and its FFN.

    ``ffn`` receives the FFN sub-layer's input (after the norm for pre-LN models); ``ffn_out``
    produces its output before dropout and the residual add (the parallel-adapter convention).
    """

    index: int
    stack: Literal["decoder", "encoder"]  # which stack of the model it belongs to
    attentions: list[Attention]
    ffn: nn.Module
    ffn_out: nn.Module
    block: nn.Module

    @property
    def self_attention(self) -> Attention:
        return self.attentions[0]


@dataclass
class Anatomy:
    """The whole backbone: family, width, layers, and the task-specific head modules."""

    family: str
    hidden_size: int
    layers: list[Layer]
    # Parameters of freshly initialised task heads (e.g. a classifier): trained, never counted.
    task_head_params: list[nn.Parameter] = field(default_factory=list)

    def attentions(self, which: str = "self") -> list[tuple[Layer, Attention]]:
        """Attention modules of kind `which` (self | cross | all), in layer order."""
        if which not in ("self", "cross", "all"):
            raise ValueError(f"attention must be self, cross or all, not {which!r}")
        return [
            (layer, att)
            for layer in self.layers
            for att in layer.attentions
            if which == "all" or att.kind == which
        ]


def linear_projection(parent: nn.Module, attr: str) -> Projection:
    """A projection stored as ``nn.Linear`` (weight ``(d_out, d_in)``)."""
    lin = getattr(parent, attr)
    return Projection(parent, attr, "linear", lin.in_features, lin.out_features)
