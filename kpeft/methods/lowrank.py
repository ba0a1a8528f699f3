"""Low-rank weight-site components. LoRA (Hu et al. 2021):

    Y = X W + 1bᵀ + s · (Drop(X) B A + 1βᵀ),   s = α / r

stored in loralib orientation: ``lora_A (r, d_in)`` is the input-side factor (Kaiming-uniform),
``lora_B (d_out, r)`` the output-side one (zero), so ``ΔW_row = s · (lora_B lora_A)ᵀ``. The extra
bias β is the official code's ([KM] footnote 1; docs/deviations.md, item 3); it is what reproduces 0.13% / 1.61%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from torch import nn

from kpeft.backbones.anatomy import Projection
from kpeft.methods.base import (
    Component,
    WeightComponent,
    attach_weight_component,
    init_input_factor,
    init_output_factor,
)
from kpeft.methods.dropout import branch_dropout
from kpeft.methods.registry import BuildContext, ComponentConfig, bias_flag, budget_sizes, register


@dataclass
class LoRAConfig(ComponentConfig):
    """LoRA (Hu et al. 2021): Y = XW + b + s·(Drop(X) B A + β), s = alpha / r."""

    kind: str = "lora"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    r: int = MISSING
    alpha: float = 32.0
    dropout: float = 0.1
    # auto: a trained bias β iff the adapted projection has a bias (GPT-2/BERT yes, T5/Llama no).
    train_bias: str = "auto"  # auto | true | false
    init: str = "kaiming_zero"  # kaiming_zero | houlsby | zero_zero (both zero; tests only)
    # Which attention modules: self | cross | all (T5 decoder cross-attention).
    attention: str = "self"


@budget_sizes("lora")
@dataclass
class LoRASize:
    r: int = MISSING
    attention: str = "self"  # self | cross | all (t5_glue: all 36 attention modules, docs/deviations.md)
    train_layernorm: bool = False  # t5_glue: true (the Compacter recipe)


def lora_scaling(alpha: float, r: int, fidelity: str = "paper") -> float:
    """``α / r``; the official code uses 1 when ``α ≤ 1.5`` (docs/deviations.md, item 2)."""
    if fidelity == "code" and alpha <= 1.5:
        return 1.0
    return alpha / r


class LoRA(WeightComponent):
    """A rank-r branch ``s·(Drop(x) Aᵀ Bᵀ + β)`` parallel to one projection."""

    def __init__(
        self,
        projection: Projection,
        r: int,
        alpha: float = 32.0,
        dropout: float = 0.0,
        train_bias: bool = False,
        init: str = "kaiming_zero",
        fidelity: str = "paper",
    ):
        super().__init__(projection)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        ref = projection.module.weight
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.r = r
        self.scaling = lora_scaling(alpha, r, fidelity)
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.d_out, r, **kw))
        self.lora_bias = nn.Parameter(torch.zeros(self.d_out, **kw)) if train_bias else None
        self.dropout = branch_dropout(dropout)
        init_input_factor(self.lora_A, init, fan_in=self.d_in)
        init_output_factor(self.lora_B, init)
        if self.lora_bias is not None and init == "houlsby":
            init_output_factor(self.lora_bias, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B, self.lora_bias)
        return out * self.scaling if self.scaling != 1.0 else out

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).t() * self.scaling

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.lora_bias is None else self.lora_bias * self.scaling

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, r={self.r}, scaling={self.scaling:g}, bias={self.lora_bias is not None}"


@register("lora", LoRAConfig)
def build_lora(cfg: DictConfig, ctx: BuildContext) -> list[Component]:
    """LoRA on ``cfg.targets`` of every ``cfg.attention`` module (self | cross | all)."""
    comps: list[Component] = []
    for _, att in ctx.anatomy.attentions(cfg.attention):
        for target in cfg.targets:
            proj = att.projection(target)
            comp = LoRA(
                proj, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                train_bias=bias_flag(cfg.train_bias, proj.has_bias), init=cfg.init, fidelity=ctx.fidelity,
            )
            attach_weight_component(comp)
            comps.append(comp)
    return comps
