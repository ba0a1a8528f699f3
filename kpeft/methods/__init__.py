"""PEFT methods as components attached at sites of a backbone (see docs/architecture.md).

Importing this package registers every component kind: each module below registers its builders
with ``@register("<kind>")``. A new component module gets one line here.
"""

from kpeft.methods import (  # noqa: F401  (registration: each module registers its component kinds)
    adapters,  # adapter, compacter (block site)
    inducer,  # inducer (attention site)
    kernelwise,  # kernel_mix, kernel_wise
    kron,  # krona, krona_b, krona_b_res
    lowrank,  # lora
    mh_adapter,  # mh_parallel_adapter (attention site)
    parameters,  # bitfit, finetune
    prefix,  # prefix (attention site)
    prompt,  # prompt_tuning (input embeddings)
    said,  # said (intrinsic-dimension reparameterisation of backbone tensors)
)
from kpeft.methods.adapted import AdaptedModel, ParamCount
from kpeft.methods.registry import BUILDERS, BuildContext, apply_method, register

__all__ = ["AdaptedModel", "ParamCount", "BuildContext", "apply_method", "register", "BUILDERS"]
