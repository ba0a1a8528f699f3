"""Training options that trade compute for memory (``docs/training_memory.md``).

``train.gradient_checkpointing=true``: transformers' activation checkpointing of every block,
*non-reentrant* (``torch.utils.checkpoint(use_reentrant=False)``): a block's activations are
recomputed in the backward pass instead of kept. The non-reentrant variant needs no input that
requires a gradient, so it works with frozen embeddings (no ``enable_input_require_grads``), and it
replays the saved RNG state, so dropout masks — and hence the loss and every gradient — are those
of the run without checkpointing (``tests/test_training_memory.py``), for weight-site methods and
for the attention-site ones (prefix, inducer: their per-forward state is rebuilt in the replay).
"""

from __future__ import annotations

from torch import nn

from kpeft.errors import KpeftError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every block of `model` (non-reentrant); KpeftError where the model has no support."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise KpeftError(f"{type(model).__name__} does not support gradient checkpointing; "
                         "set train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    # transformers ≥ 5.x renamed it activation_checkpointing_enable (the old name warns)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing`."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
