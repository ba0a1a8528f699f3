"""The name of a model's KV-cache argument (and output field): ``cache`` from transformers 5.24
on, where ``past_key_values`` is a deprecated alias, and ``past_key_values`` before."""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _name_of(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(module: nn.Module) -> str:
    """``"cache"`` or ``"past_key_values"``: what `module`'s ``forward`` takes and returns."""
    return _name_of(type(module))


__all__ = ["cache_arg"]
