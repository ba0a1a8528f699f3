"""PEFT methods as components attached at sites of a backbone (see DESIGN.md).

Importing this package registers every component kind: each module below registers its builders
with ``@register("<kind>")``. A new component module gets one line here.
"""

from kpeft.methods import (  # noqa: F401  (registration: each module registers its component kinds)
    adapters,  # adapter, compacter (block site)
    inducer,  # inducer (attention site)
    kernelwise,  # kernel_mix, kernel_wise
    kron,  # krona, krona_b, krona_b_res
    lowrank,  # lora
    parameters,  # bitfit, finetune
    prefix,  # prefix (attention site)
)
from kpeft.methods.adapted import AdaptedModel, ParamCount
from kpeft.methods.registry import BUILDERS, BuildContext, apply_method, register

__all__ = ["AdaptedModel", "ParamCount", "BuildContext", "apply_method", "register", "BUILDERS"]
