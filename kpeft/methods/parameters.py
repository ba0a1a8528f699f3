"""Parameter-site components: which existing backbone tensors train.

* full fine-tuning (SPEC §7.6): every parameter;
* BitFit (SPEC §7.3): every bias, LayerNorm biases included (GPT-2 small: 102,144 = 0.08%).
  The tied GPT-2 LM head is a weight, so it stays frozen (the official code needs a flag for that).
"""

from __future__ import annotations

from collections.abc import Iterator

from omegaconf import DictConfig
from torch import nn

from kpeft.methods.base import Component
from kpeft.methods.registry import BuildContext, register


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
    weight): the Compacter-codebase recipe that SPEC §5.5 uses to reconstruct KronA's 0.07%
    (T5-base: 62 × 768 = 47,616). Used through a method's ``train_layernorm`` option."""

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for mod_name, module in model.named_modules():
            if _is_norm(module):
                for name, p in module.named_parameters(recurse=False):
                    yield (f"{mod_name}.{name}" if mod_name else name), p


@register("bitfit")
def build_bitfit(cfg: DictConfig, ctx: BuildContext) -> list[BitFit]:
    return [BitFit(include_ln_bias=cfg.include_ln_bias)]


@register("finetune")
def build_finetune(cfg: DictConfig, ctx: BuildContext) -> list[FullFinetune]:
    return [FullFinetune()]
