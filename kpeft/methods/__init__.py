"""PEFT methods as components attached at sites of a backbone (see DESIGN.md).

Importing this package registers every component kind: each module below registers its builders
with ``@register("<kind>")``. A new component module gets one line here.
"""

from kpeft.methods import lowrank, parameters  # noqa: F401  (registration)
from kpeft.methods.adapted import AdaptedModel, ParamCount
from kpeft.methods.registry import BUILDERS, BuildContext, apply_method, register

__all__ = ["AdaptedModel", "ParamCount", "BuildContext", "apply_method", "register", "BUILDERS"]
