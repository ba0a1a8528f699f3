"""Backbone families behind one description (:class:`~kpeft.backbones.anatomy.Anatomy`).

Adding a family = one module with ``describe(model) -> Anatomy`` + a line in ``FAMILIES``.
"""

from __future__ import annotations

from torch import nn

from kpeft.backbones import bert, gpt2, llama, t5
from kpeft.backbones.anatomy import Anatomy, Attention, Layer, Projection

FAMILIES = {"gpt2": gpt2.describe, "bert": bert.describe, "t5": t5.describe, "llama": llama.describe}
FAMILY_OF_MODEL_TYPE = {
    "gpt2": "gpt2", "bert": "bert", "roberta": "bert", "t5": "t5",
    # the Llama anatomy (docs/backbones.md): Mistral, Qwen2 (q/k/v biases), Phi-3 (fused qkv_proj)
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "phi3": "llama",
}
# Heads each family can be built with; the first is what `kpeft.count` uses.
HEADS_OF_FAMILY = {
    "gpt2": ("causal_lm", "classification"),
    "bert": ("base", "classification"),
    "t5": ("seq2seq",),
    "llama": ("causal_lm", "classification"),
}
TASK_HEAD_NAMES = ("classifier", "score")  # freshly initialised heads of *ForSequenceClassification


def describe(model: nn.Module) -> Anatomy:
    """The anatomy of a transformers model, with its new task-head parameters listed."""
    family = FAMILY_OF_MODEL_TYPE.get(model.config.model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {model.config.model_type!r}; supported: {sorted(FAMILY_OF_MODEL_TYPE)}")
    anatomy = FAMILIES[family](model)
    for name in TASK_HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            anatomy.task_head_params.extend(head.parameters())
    return anatomy


__all__ = ["Anatomy", "Attention", "Layer", "Projection", "describe", "FAMILIES", "HEADS_OF_FAMILY"]
