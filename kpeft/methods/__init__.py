"""PEFT methods as components attached at sites of a backbone (see DESIGN.md)."""

from kpeft.methods.adapted import AdaptedModel, ParamCount
from kpeft.methods.registry import BUILDERS, apply_method, register

__all__ = ["AdaptedModel", "ParamCount", "apply_method", "register", "BUILDERS"]
