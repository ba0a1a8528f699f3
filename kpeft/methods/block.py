"""The block site: modules attached around a transformer sub-layer (docs/architecture.md, "block").

**Parallel to the FFN** (He et al. 2022's parallel-adapter convention; [KA] Eq. 5)::

    FFN_out ← FFN(x) + Δ(x),      x = the FFN sub-layer's input (after the norm of pre-LN models)

``Δ(x)`` is added to the FFN's output *before* the sub-layer's dropout and residual add. It is
installed with two hooks on modules the backbone anatomy names, without forking any modeling code
(the model's own layer loop calls them; nothing here loops over layers or heads):

* a forward **pre-hook on** ``layer.ffn`` (the module whose *input* is the FFN input) captures ``x``;
* a forward **hook on** ``layer.ffn_out`` (the module whose *output* is the FFN output) returns
  ``out + Δ(x)`` and drops the captured tensor.

================  ==============================================  ===========================
family            ``layer.ffn`` (its input is x)                  ``layer.ffn_out``
================  ==============================================  ===========================
GPT-2             ``mlp`` (x = ln_2(h))                           ``mlp.c_proj``
BERT / RoBERTa    ``intermediate`` (x = attention output, post-LN) ``output.dense``
T5                ``layer[-1].DenseReluDense`` (x = RMS-LN(h))     ``DenseReluDense.wo``
Llama             ``mlp`` (x = RMSNorm(h))                        ``mlp.down_proj``
================  ==============================================  ===========================

The component becomes a submodule of ``layer.ffn`` (``<ffn>.kpeft_parallel.<i>``) so that the
model's ``named_parameters()``/``state_dict()`` see it; :meth:`ParallelHandle.remove` takes the
hooks and the submodule away again, restoring the backbone exactly. Several components may sit
on the same FFN (their deltas add up).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kpeft.backbones.anatomy import Layer
from kpeft.methods.base import Component

PARALLEL_ATTR = "kpeft_parallel"


def add_child(module: nn.Module, attr: str, component: nn.Module) -> None:
    """Register `component` in the ModuleList ``module.<attr>`` (created on first use), so that the
    model saves it and DDP sees its parameters."""
    siblings = module._modules.get(attr)
    if siblings is None:
        siblings = nn.ModuleList()
        module.add_module(attr, siblings)
    siblings.append(component)


def remove_child(module: nn.Module, attr: str, component: nn.Module) -> None:
    """Undo :func:`add_child` (the list goes when it is empty)."""
    siblings = module._modules.get(attr)
    if siblings is None:
        return
    rest = [m for m in siblings if m is not component]
    if rest:
        module._modules[attr] = nn.ModuleList(rest)
    else:
        del module._modules[attr]


class BlockComponent(Component):
    """A module at the block site: ``forward(x)`` maps the sub-layer input ``(..., d_in)`` to
    what is added to the sub-layer output ``(..., d_out)``. Not mergeable: it runs at inference."""

    site: ClassVar[str] = "block"
    mergeable: ClassVar[bool] = False

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.handle: ParallelHandle | None = None  # set by attach_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The sub-layer's input: its first positional tensor, else ``hidden_states=`` / any tensor kwarg."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError("the hooked sub-layer was called without a tensor input")


class ParallelHandle:
    """One attached component: its two hooks (bound methods of this handle, so that
    ``copy.deepcopy(model)`` gives a copy whose hooks call the *copied* component) and its
    registration under `entry`; :meth:`remove` undoes both."""

    def __init__(self, entry: nn.Module, exit: nn.Module, component: BlockComponent):
        self.entry, self.exit, self.component = entry, exit, component
        self._captured: list[torch.Tensor] = []
        self.hooks: list[RemovableHandle] = []

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._captured[:] = [_first_tensor(args, kwargs)]

    def _add(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not self._captured:
            raise RuntimeError(
                f"{type(self.component).__name__}: {type(self.exit).__name__} ran without "
                f"{type(self.entry).__name__} having captured the sub-layer input (it adds to the output "
                "of a whole sub-layer call, not of a standalone call)"
            )
        x = self._captured.pop()  # dropped at once: the hook keeps no activation alive
        return out + self.component(x).to(out.dtype)

    @property
    def attached(self) -> bool:
        return bool(self.hooks)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self._captured.clear()
        remove_child(self.entry, PARALLEL_ATTR, self.component)
        self.component.handle = None


def attach_parallel(entry: nn.Module, exit: nn.Module, component: BlockComponent) -> ParallelHandle:
    """Add ``component(x)`` to the output of `exit`, where ``x`` is the input `entry` received in
    the same forward pass (`entry` runs first and contains `exit`, or runs just before it).

    The component is registered as a submodule of `entry`; returns the removable handle (also
    kept as ``component.handle``).
    """
    add_child(entry, PARALLEL_ATTR, component)
    handle = ParallelHandle(entry, exit, component)
    handle.hooks = [
        entry.register_forward_pre_hook(handle._capture, with_kwargs=True),
        exit.register_forward_hook(handle._add),
    ]
    component.handle = handle
    return handle


def attach_parallel_ffn(layer: Layer, component: BlockComponent) -> ParallelHandle:
    """``FFN_out ← FFN(x) + component(x)`` on `layer` (x = FFN input, before dropout/residual)."""
    return attach_parallel(layer.ffn, layer.ffn_out, component)
