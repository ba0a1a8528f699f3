"""The component registry and method application.

``apply_method(model, method_cfg)`` freezes the backbone, builds every component the method
declares (``method.components.<name>.kind`` picks a builder registered here), installs them at
their sites (with ``method.train_layernorm``, the backbone's LayerNorms train too), and returns an
:class:`AdaptedModel` that counts, merges and saves them.

A component kind lives in one module of this package, which registers it in one call:
``@register("<kind>", <Schema>)`` on its builder (the schema is the dataclass Hydra validates
``component/<kind>`` against), and ``@budget_sizes("<method>", ...)`` on the dataclass of the sizes a
budget gives the method (``budget.<method>``). ``kpeft/methods/__init__.py`` imports every module of the
package, and ``kpeft/config.py`` builds its schemas from these tables (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig

from kpeft.backbones import Anatomy
from kpeft.errors import KpeftError
from kpeft.methods.adapted import AdaptedModel
from kpeft.methods.base import Component


@dataclass
class BuildContext:
    """What a builder may look at besides its own config."""

    anatomy: Anatomy
    method_name: str
    fidelity: str = "paper"
    # The whole transformers model (attention-site components switch its attention
    # implementation and hook its position embeddings).
    model: Any = None


LAYERNORM = "train_layernorm"  # the entry of method.train_layernorm in AdaptedModel.components


@dataclass
class ComponentConfig:
    """Fields every component schema has; ``kind`` selects the builder."""

    kind: str = MISSING


# A builder walks the anatomy, creates its components, attaches them, and returns them.
Builder = Callable[[DictConfig, BuildContext], list[Component]]
BUILDERS: dict[str, Builder] = {}
SCHEMAS: dict[str, type] = {}  # component kind -> its config dataclass (Hydra group `component`)
BUDGET_SIZES: dict[str, type] = {}  # method name -> the dataclass of budget.<method>


def register(kind: str, schema: type) -> Callable[[Builder], Builder]:
    """Register component kind `kind`: its builder (the decorated function) and its config schema."""
    if getattr(schema, "kind", None) != kind:
        raise TypeError(f"the schema of component kind {kind!r} must default its `kind` field to {kind!r}")

    def deco(fn: Builder) -> Builder:
        BUILDERS[kind] = fn
        SCHEMAS[kind] = schema
        return fn

    return deco


def budget_sizes(*methods: str) -> Callable[[type], type]:
    """Make the decorated dataclass the schema of ``budget.<method>`` for each of `methods`
    (a budget without that section cannot meet the method)."""

    def deco(schema: type) -> type:
        for method in methods:
            BUDGET_SIZES[method] = schema
        return schema

    return deco


def bias_flag(value: str, has_bias: bool) -> bool:
    """``train_bias``: auto (iff the projection has a bias: GPT-2/BERT yes, T5/Llama no), true, false."""
    value = str(value).lower()
    if value == "auto":
        return has_bias
    if value in ("true", "false"):
        return value == "true"
    raise KpeftError(f"train_bias must be auto, true or false, not {value!r}")


def apply_method(model, anatomy: Anatomy, method: DictConfig, fidelity: str = "paper") -> AdaptedModel:
    """Freeze `model`, install `method`'s components, and return the adapted model."""
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in anatomy.task_head_params)
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = BuildContext(anatomy=anatomy, method_name=method.name, fidelity=fidelity, model=model)
    components: dict[str, list[Component]] = {}
    for name, ccfg in method.components.items():
        builder = BUILDERS.get(ccfg.kind)
        if builder is None:
            raise KpeftError(
                f"method '{method.name}': unknown component kind {ccfg.kind!r} in components.{name}; "
                f"known kinds: {', '.join(sorted(BUILDERS))}"
            )
        try:
            components[name] = builder(ccfg, ctx)
        except (ValueError, NotImplementedError) as err:
            raise KpeftError(f"method '{method.name}' does not fit backbone '{anatomy.family}': {err}") from None
    if method.get("train_layernorm", False):
        from kpeft.methods.parameters import LayerNormTuning  # (parameters.py registers builders here)

        components[LAYERNORM] = [LayerNormTuning()]
    adapted = AdaptedModel(model, anatomy, components, backbone_total=total)
    adapted.set_trainable(train_task_head=method.train_task_head)
    if adapted.count().trainable == 0 and method.components:
        raise KpeftError(
            f"method '{method.name}' found nothing to train on backbone '{anatomy.family}' "
            "(e.g. BitFit on a model without biases)"
        )
    return adapted
