"""Components and the weight site.

A PEFT method is a set of *components*, each attached at one kind of site (docs/architecture.md):

* **weight** — a branch parallel to a projection, ``y = base(x) + Δ(x)``, whose effect is a fixed
  weight delta ``ΔW`` (row convention, ``(d_in, d_out)``) and bias delta: mergeable.
* **attention**, **block** — modules inside the attention computation or around a sub-layer
  (later method families).
* **parameters** — which existing backbone tensors train (full fine-tuning, BitFit, LayerNorms),
  or tensors added to the backbone (a task's new vocabulary rows, :mod:`kpeft.methods.vocabulary`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from kpeft.backbones.anatomy import Projection


class Component(nn.Module):
    """Base class of every component; ``site`` says where it attaches."""

    site: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    # False: trained but outside the budget, reported as ``uncounted`` (task-token rows).
    counted: ClassVar[bool] = True

    def stored_numel(self) -> int:
        """Numbers kept after training (differs from the trained count only for re-parameterised
        methods such as prefix-tuning)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def upgrade_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An adapter state saved by an earlier kpeft version, under this version's names
        (unchanged by default)."""
        return state

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors the component keeps alive outside its parameters and buffers (memory
        accounting, e.g. SAID's regenerated random projection); none by default."""
        return []


class WeightComponent(Component):
    """A branch parallel to one projection (or one column block of a fused projection)."""

    site = "weight"
    mergeable = True
    # A branch that reads the frozen projection's own output sets this (class or instance) and is
    # called as ``branch(x, y)``: GPT-2's fused c_attn output holds the keys that Kernel-wise-lite
    # reuses ([KM] App. B.3).
    uses_base_output: bool = False

    def __init__(self, projection: Projection):
        super().__init__()
        # Plain attribute (not a submodule): the handle points back into the backbone.
        object.__setattr__(self, "projection", projection)
        self.d_in, self.d_out = projection.d_in, projection.d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The branch output, shape ``(..., d_out)``, added to the projection's output."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """``ΔW`` in row convention ``(d_in, d_out)`` with all scalings applied."""
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """The bias delta ``(d_out,)`` with scalings applied, or None."""
        return None

    def unmerge_delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What :meth:`AdaptedProjection.unmerge` adds to the merged weight and bias: minus the
        delta. A delta computed from the frozen weight itself (a rescaling, (IA)³) reads the merged
        weight by then and overrides this."""
        bias = self.delta_bias()
        return -self.delta_weight(), None if bias is None else -bias


class AdaptedProjection(nn.Module):
    """A frozen projection plus weight-site branches: ``y = base(x) + Σ_c c(x)`` on each branch's
    column block. After :meth:`merge` the branches are folded into ``base`` and skipped, so
    inference runs the backbone's own graph."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleList()
        self.merged = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # weight, bias, nf, in_features ... of the wrapped module
            return getattr(super().__getattr__("base"), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.branches:
            return y
        # Sum the branches per column block (GPT-2's fused c_attn: q and v blocks).
        deltas: dict[tuple[int, int], torch.Tensor] = {}
        for branch in self.branches:
            key = (branch.projection.start, branch.projection.stop)
            out = branch(x, y) if branch.uses_base_output else branch(x)
            deltas[key] = out if key not in deltas else deltas[key] + out
        if not torch.is_grad_enabled():  # inference: add each block in place, no graph to keep
            for (start, stop), delta in deltas.items():
                y[..., start:stop] += delta
            return y
        return add_blocks(y, deltas)

    def check_mergeable(self) -> None:
        """Raise before :meth:`merge` changes any weight if a branch's delta cannot be folded in
        (a trained bias β on a projection without a bias: T5/Llama with ``train_bias=true``)."""
        for branch in self.branches:
            if not branch.mergeable:  # e.g. the inducer's value branch (no fixed weight delta)
                raise ValueError(f"{type(branch).__name__} on {type(self.base).__name__} cannot be merged")
            if branch.delta_bias() is not None and not branch.projection.has_bias:
                raise ValueError(
                    f"cannot merge {type(branch).__name__}'s bias into {type(self.base).__name__} without a "
                    "bias; set the component's train_bias=false for bias-free backbones"
                )

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.check_mergeable()
            for branch in self.branches:
                branch.projection.add_to_weight(branch.delta_weight(), branch.delta_bias())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for branch in reversed(self.branches):  # undo in the reverse order of merge()
                branch.projection.add_to_weight(*branch.unmerge_delta())
            self.merged = False


def add_blocks(y: torch.Tensor, deltas: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """``y`` plus column-block deltas, out of place: the blocks are concatenated (zero-stride
    zeros in the gaps) into one ``(…, d_out)`` delta and added once, so the backward hands each
    branch a view of the gradient (in-place block adds would copy and zero-fill the whole
    gradient once per block). Overlapping blocks go into further passes."""
    pending, width = sorted(deltas.items()), y.shape[-1]
    while pending:
        pieces, pos, later = [], 0, []
        for (start, stop), delta in pending:
            if start < pos:
                later.append(((start, stop), delta))
                continue
            if start > pos:
                pieces.append(delta.new_zeros(()).expand(*delta.shape[:-1], start - pos))
            pieces.append(delta)
            pos = stop
        if pos < width:
            pieces.append(pieces[-1].new_zeros(()).expand(*pieces[-1].shape[:-1], width - pos))
        y = y + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))
        pending = later
    return y


def attach_weight_component(component: WeightComponent) -> None:
    """Install `component` on its projection, wrapping the projection once."""
    proj = component.projection
    current = getattr(proj.parent, proj.attr)
    if not isinstance(current, AdaptedProjection):
        current = AdaptedProjection(current)
        setattr(proj.parent, proj.attr, current)
    current.branches.append(component)


def init_input_factor(t: torch.Tensor, scheme: str, fan_in: int) -> None:
    """Initialise an input-side factor: Kaiming-uniform(a=√5) with the given fan-in (bound
    ``1/√fan_in``), or the official code's ``houlsby`` truncated normal."""
    if scheme == "houlsby":
        trunc_normal_001_(t)
    elif scheme in ("kaiming_zero", "zero_zero"):
        if scheme == "zero_zero":
            nn.init.zeros_(t)
        else:
            bound = 1.0 / math.sqrt(fan_in)  # = kaiming_uniform_(a=√5) for fan_in inputs
            nn.init.uniform_(t, -bound, bound)
    else:
        raise ValueError(f"unknown init {scheme!r}; valid: kaiming_zero, houlsby, zero_zero")


def init_output_factor(t: torch.Tensor, scheme: str) -> None:
    """Output-side factor: zero (ΔW = 0 at step 0) or ``houlsby``."""
    if scheme == "houlsby":
        trunc_normal_001_(t)
    else:
        nn.init.zeros_(t)


def trunc_normal_001_(t: torch.Tensor) -> torch.Tensor:
    """The official code's "Houlsby" init (docs/deviations.md, item 1): ``fmod(N(0,1), 2) · 0.01`` (wrapped, not
    resampled)."""
    with torch.no_grad():
        return t.copy_(torch.fmod(torch.randn_like(t), 2.0) * 0.01)
