"""A backbone with a method installed: counting, merging, adapter-only state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from kpeft.backbones import Anatomy
from kpeft.methods.base import AdaptedProjection, Component


@dataclass(frozen=True)
class ParamCount:
    """Parameter accounting of one run ([KM] Table 1, App. B.1)."""

    total: int  # the backbone's own parameters, before the method (tied weights once, no task head)
    trainable: int  # trained parameters that count towards the budget
    stored: int  # numbers kept after training (differs for re-parameterised prefixes)
    uncounted: int = 0  # trained but excluded from the budget (task head, task embedding rows)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / self.total

    @property
    def stored_pct(self) -> float:
        return 100.0 * self.stored / self.total

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_pct": self.trainable_pct, "stored_pct": self.stored_pct}


class AdaptedModel:
    """The backbone (a transformers model, modified in place) and the method's components."""

    def __init__(
        self, model: nn.Module, anatomy: Anatomy, components: dict[str, list[Component]], backbone_total: int
    ):
        self.model = model
        self.anatomy = anatomy
        self.components = components
        self.backbone_total = backbone_total
        self._uncounted: dict[int, nn.Parameter] = {}
        # Frozen tensors that get a gradient for the clipping norm only (never stepped, saved or counted).
        self._gradient_only: dict[int, nn.Parameter] = {}
        # The task's vocabulary rows (kpeft.methods.vocabulary): {"rows_from", "rows", "token_types"}.
        self.vocabulary: dict | None = None
        # The method config and fidelity it was built from (kpeft.api: save_adapter needs them).
        self.method_cfg = None
        self.fidelity = "paper"

    def __call__(self, *args, **kwargs):
        """Run the adapted transformers model."""
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        # generate, config, to, eval ... of the wrapped transformers model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def save_adapter(self, directory):
        """The trained tensors and the method config in `directory` (:func:`kpeft.api.save_adapter`)."""
        from kpeft.api import save_adapter

        return save_adapter(self, directory)

    # ------------------------------------------------------------ trainability
    def all_components(self) -> Iterable[Component]:
        for comps in self.components.values():
            yield from comps

    def set_trainable(self, train_task_head: bool = True) -> None:
        """Components' own parameters and their selected backbone tensors train; the rest is frozen."""
        for comp in self.all_components():
            if comp.site == "parameters":
                for _, p in comp.select(self.model):
                    p.requires_grad_(True)
            for p in comp.parameters():
                p.requires_grad_(True)
        for p in self.anatomy.task_head_params:
            p.requires_grad_(train_task_head)
            self.mark_uncounted(p)

    def mark_uncounted(self, param: nn.Parameter) -> None:
        """Train `param` but leave it out of the budget (task heads)."""
        self._uncounted[id(param)] = param

    def mark_gradient_only(self, param: nn.Parameter) -> None:
        """`param` (frozen) gets a gradient that enters the clipping norm, but is never stepped,
        saved or counted (``fidelity=code`` with task tokens: docs/deviations.md, item 13)."""
        self._gradient_only[id(param)] = param

    def gradient_only_parameters(self) -> list[nn.Parameter]:
        return list(self._gradient_only.values())

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters()
                if p.requires_grad and id(p) not in self._gradient_only]

    # ------------------------------------------------------------ counting
    def count(self) -> ParamCount:
        counted = [c for c in self.all_components() if c.counted]
        uncounted_ids = set(self._uncounted)
        uncounted_ids.update(id(p) for c in self.all_components() if not c.counted for p in c.parameters())
        trainable = uncounted = 0
        for _, p in self.trainable_parameters():
            if id(p) in uncounted_ids:
                uncounted += p.numel()
            else:
                trainable += p.numel()
        own = sum(sum(p.numel() for p in c.parameters() if p.requires_grad) for c in counted)
        stored = trainable - own + sum(c.stored_numel() for c in counted)
        return ParamCount(self.backbone_total, trainable, stored, uncounted)

    # ------------------------------------------------------------ merging
    def projections(self) -> list[AdaptedProjection]:
        return [m for m in self.model.modules() if isinstance(m, AdaptedProjection)]

    @property
    def mergeable(self) -> bool:
        if not all(c.mergeable or c.site == "parameters" for c in self.all_components()):
            return False
        try:
            for p in self.projections():
                p.check_mergeable()
        except ValueError:
            return False
        return True

    @property
    def merged(self) -> bool:
        projs = self.projections()
        return bool(projs) and all(p.merged for p in projs)

    def merge(self) -> None:
        """Fold every weight-site delta into the frozen weights (inference at backbone speed)."""
        projections = self.projections()
        for p in projections:  # all or nothing: never leave some weights merged
            p.check_mergeable()
        for p in projections:
            p.merge()

    def unmerge(self) -> None:
        for p in self.projections():
            p.unmerge()

    # ------------------------------------------------------------ adapter-only state
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changed: trainable tensors (a 0.1% adapter is saved as 0.1%)."""
        if self.merged:
            raise RuntimeError("unmerge() before saving: merged weights would be saved twice")
        return {n: p.detach().clone().contiguous() for n, p in self.trainable_parameters()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before loading: the merged weights hold the old deltas")
        for comp in self.all_components():
            state = comp.upgrade_state(self.model, state)
        params = dict(self.trainable_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"adapter state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
