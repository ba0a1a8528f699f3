"""(IA)³ (Liu et al. 2022, §3.3): learned vectors rescale the keys, the values and the FFN's hidden
activations,

    softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V),        (l_ff ⊙ γ(W_1 x)) W_2,

with ``l_k, l_v ∈ R^{d_kv}`` per attention module and ``l_ff ∈ R^{d_ff}`` per layer, initialised to 1.
Both are weight deltas: ``K' = X W_k diag(l_k) + b_k ⊙ l_k`` scales the columns of W_k (and its bias),
``(l_ff ⊙ h) W_2 = h diag(l_ff) W_2`` the rows of W_2; so the branches are written as the difference
from the frozen projection, ``(l − 1) ⊙ y`` and ``((l − 1) ⊙ h) W_2``, and merge into the weights.

This module is the worked example of docs/extending.md ("Add a method"): the schema, the builder and
the component in one file, plus ``conf/method/ia3.yaml`` and its rows in ``tests/test_matrix.py``.
It has no sizes, so it needs no budget section and meets every budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from kpeft.backbones.anatomy import Layer, Projection, linear_projection
from kpeft.methods.base import Component, WeightComponent, attach_weight_component
from kpeft.methods.registry import BuildContext, ComponentConfig, register


@dataclass
class IA3Config(ComponentConfig):
    """(IA)³ (Liu et al. 2022): l_k, l_v on `targets` of every `attention` module; l_ff with `ffn`."""

    kind: str = "ia3"
    targets: list[str] = field(default_factory=lambda: ["k", "v"])
    ffn: bool = True  # also l_ff on the FFN's hidden activations (the input of its output projection)
    attention: str = "all"  # self | cross | all (the paper rescales every attention module)


class OutputScale(WeightComponent):
    """``y ← l ⊙ y`` on one projection's output block: the branch ``(l − 1) ⊙ y`` reads the frozen output."""

    uses_base_output = True

    def __init__(self, projection: Projection):
        super().__init__(projection)
        ref = projection.module.weight
        self.scale = nn.Parameter(torch.ones(self.d_out, device=ref.device, dtype=ref.dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.scale - 1) * y[..., self.projection.start : self.projection.stop]

    def delta_weight(self) -> torch.Tensor:
        return self.projection.weight() * (self.scale - 1)  # columns of W (row convention (d_in, d_out))

    def delta_bias(self) -> torch.Tensor | None:
        bias = self.projection.bias()
        return None if bias is None else bias * (self.scale - 1)

    def unmerge_delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # merged: W' = W diag(l), so W − W' = W' (1/l − 1); the same for the bias
        back = 1 / self.scale - 1
        bias = self.projection.bias()
        return self.projection.weight() * back, None if bias is None else bias * back


class InputScale(WeightComponent):
    """``x ← l ⊙ x`` at one projection's input: the branch ``((l − 1) ⊙ x) W`` (no bias)."""

    def __init__(self, projection: Projection):
        super().__init__(projection)
        ref = projection.module.weight
        self.scale = nn.Parameter(torch.ones(self.d_in, device=ref.device, dtype=ref.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear((self.scale - 1) * x, self.projection.weight().t())

    def delta_weight(self) -> torch.Tensor:
        return (self.scale - 1)[:, None] * self.projection.weight()  # rows of W

    def unmerge_delta(self) -> tuple[torch.Tensor, None]:
        # merged: W' = diag(l) W, so W − W' = diag(1/l − 1) W'
        return (1 / self.scale - 1)[:, None] * self.projection.weight(), None


def ffn_out_projection(layer: Layer) -> Projection:
    """The FFN's output projection W_2 of `layer` (GPT-2 ``Conv1D`` or ``nn.Linear``) as a Projection."""
    for name, module in layer.block.named_modules():
        if module is layer.ffn_out:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.block.get_submodule(parent_name)
            if isinstance(module, nn.Linear):
                return linear_projection(parent, attr)
            d_in, d_out = module.weight.shape  # transformers' Conv1D stores W as (d_in, d_out)
            return Projection(parent, attr, "conv1d", d_in, d_out)
    raise ValueError(f"layer {layer.index}: the FFN's output projection is not a module of the block")


@register("ia3", IA3Config)
def build_ia3(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """l_k, l_v on every ``cfg.attention`` module and, with ``cfg.ffn``, l_ff on every layer's FFN."""
    comps: list[WeightComponent] = [
        OutputScale(att.projection(target)) for _, att in ctx.anatomy.attentions(cfg.attention) for target in cfg.targets
    ]
    if cfg.ffn:
        comps += [InputScale(ffn_out_projection(layer)) for layer in ctx.anatomy.layers]
    for comp in comps:  # every branch is built before the backbone changes
        attach_weight_component(comp)
    return comps
