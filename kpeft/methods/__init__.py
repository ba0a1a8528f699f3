"""PEFT methods as components attached at sites of a backbone (see docs/architecture.md).

Importing this package imports every module in it, and each component module registers its kinds
on import (``@register("<kind>", <Schema>)``, ``@budget_sizes(...)``; kpeft/methods/registry.py): a
new component module needs no line anywhere else.
"""

import importlib
import pkgutil

from kpeft.methods.adapted import AdaptedModel, ParamCount
from kpeft.methods.registry import BUDGET_SIZES, BUILDERS, SCHEMAS, BuildContext, apply_method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AdaptedModel", "ParamCount", "BuildContext", "apply_method", "register", "BUILDERS", "SCHEMAS",
           "BUDGET_SIZES"]
