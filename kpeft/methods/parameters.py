"""Parameter-site components: which existing backbone tensors train.

* full fine-tuning ([KM] Table 1): every parameter;
* BitFit (Ben Zaken et al. 2022): every bias, LayerNorm biases included (GPT-2 small: 102,144 = 0.08%).
  The tied GPT-2 LM head is a weight, so it stays frozen (the official code needs a flag for that).
  On a backbone without biases (T5, Llama), ``add_missing_biases`` first gives every linear layer
  and norm a zero-initialised bias, as the Compacter code does for T5 (its modified T5 builds
  q, k, v, o, wi, wo, the LM head and the RMS norms with biases; KronA reports its 0.12%): T5-base
  110,592 attention + 92,160 FFN + 47,616 norm + 32,128 LM-head biases = 282,496 (0.127%).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from kpeft.methods.base import Component
from kpeft.methods.registry import BuildContext, ComponentConfig, register


@dataclass
class BitFitConfig(ComponentConfig):
    """BitFit (Ben Zaken et al. 2022): train every bias, LayerNorm biases included."""

    kind: str = "bitfit"
    include_ln_bias: bool = True
    # Zero-initialised biases where a linear layer or norm has none (Compacter / KronA BitFit on T5):
    # auto = on a backbone without any bias (T5, Llama) | true | false.
    add_missing_biases: str = "auto"


@dataclass
class FullFinetuneConfig(ComponentConfig):
    """Full fine-tuning ([KM] Table 1): every backbone parameter trains."""

    kind: str = "finetune"


class ParameterComponent(Component):
    """Unfreezes selected backbone parameters; owns none of its own."""

    site = "parameters"

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:  # pragma: no cover
        raise NotImplementedError


class FullFinetune(ParameterComponent):
    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        yield from model.named_parameters()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _add_norm_bias(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output + module.bias  # a bias added to a norm that has none (T5 / Llama RMS norm)


def has_biases(model: nn.Module) -> bool:
    """Whether any module of `model` has a bias parameter."""
    return any(isinstance(getattr(m, "bias", None), nn.Parameter) for m in model.modules())


def add_missing_biases(model: nn.Module, skip: frozenset[int] | set[int] = frozenset(), norms: bool = True) -> int:
    """Give every ``nn.Linear`` (except those whose weight id is in `skip`) and, with `norms`,
    every norm layer without a bias a zero-initialised one; returns how many numbers were added.
    ``nn.LayerNorm`` uses its new bias itself; other norms (RMS norms) get a forward hook adding it."""
    added = 0
    for module in list(model.modules()):
        if getattr(module, "bias", None) is not None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if isinstance(module, nn.Linear) and id(weight) not in skip:
            module.bias = nn.Parameter(weight.new_zeros(module.out_features))
        elif norms and _is_norm(module) and weight.dim() == 1:
            module.bias = nn.Parameter(torch.zeros_like(weight))
            if not isinstance(module, nn.LayerNorm):
                module.register_forward_hook(_add_norm_bias)
        else:
            continue
        added += module.bias.numel()
    return added


class BitFit(ParameterComponent):
    def __init__(self, include_ln_bias: bool = True):
        super().__init__()
        self.include_ln_bias = include_ln_bias

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for mod_name, module in model.named_modules():
            bias = getattr(module, "bias", None)
            if not isinstance(bias, nn.Parameter) or "bias" not in module._parameters:
                continue
            if _is_norm(module) and not self.include_ln_bias:
                continue
            yield (f"{mod_name}.bias" if mod_name else "bias"), bias


class LayerNormTuning(ParameterComponent):
    """Every normalisation layer's own parameters train (LayerNorm γ and β, T5/Llama RMSNorm
    weight): the Compacter-codebase recipe that our reading of KronA's 0.07% uses (docs/deviations.md)
    (T5-base: 62 × 768 = 47,616). Used through a method's ``train_layernorm`` option."""

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for mod_name, module in model.named_modules():
            if _is_norm(module):
                for name, p in module.named_parameters(recurse=False):
                    yield (f"{mod_name}.{name}" if mod_name else name), p


@register("bitfit", BitFitConfig)
def build_bitfit(cfg: DictConfig, ctx: BuildContext) -> list[BitFit]:
    """BitFit; ``add_missing_biases`` (auto: on a backbone without any bias) adds zero biases first."""
    add = str(cfg.get("add_missing_biases", "auto")).lower()
    if add not in ("auto", "true", "false"):
        raise ValueError(f"add_missing_biases must be auto, true or false, not {add!r}")
    if add == "true" or (add == "auto" and not has_biases(ctx.model)):
        head = {id(p) for p in ctx.anatomy.task_head_params}  # a new task head stays as it is
        add_missing_biases(ctx.model, skip=head, norms=bool(cfg.include_ln_bias))
    return [BitFit(include_ln_bias=cfg.include_ln_bias)]


@register("finetune", FullFinetuneConfig)
def build_finetune(cfg: DictConfig, ctx: BuildContext) -> list[FullFinetune]:
    return [FullFinetune()]
