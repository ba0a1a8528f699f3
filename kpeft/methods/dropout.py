"""Dropout on a branch's input, with a cheaper mask on CPU.

Weight-site branches drop their *input* (the full-width hidden states; Hu et al. 2021; [KM] §4), and
Kernel-mix has up to six independent masks per layer, so the mask is a measurable part of a CPU
training step. ``nn.Dropout`` draws it with ``bernoulli_``; :class:`BranchDropout` draws uniforms
and compares, ``keep = U[0,1) ≥ p`` — Bernoulli(1 − p) up to float32's 2⁻²⁴ resolution, about
twice as fast on CPU — and keeps torch's inverted scaling ``x · keep / (1 − p)``. Masks come from
the default generator, so seeding and checkpointed RNG states reproduce them. On other devices
(where ``F.dropout`` is one fused kernel) it is ``nn.Dropout``.
"""

from __future__ import annotations

import torch
from torch import nn


class _UniformMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        uniform = torch.rand_like(x, dtype=torch.promote_types(x.dtype, torch.float32))  # ≥ 24-bit uniforms
        mask = uniform.ge_(p).mul_(1.0 / (1.0 - p)).to(x.dtype)  # 0 or 1/(1−p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class BranchDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, train/eval behaviour and scaling) with a uniform-threshold
    mask on CPU (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or self.p >= 1.0 or not x.is_floating_point():
            return super().forward(x)
        return _UniformMaskDropout.apply(x, self.p)


def branch_dropout(p: float) -> nn.Module:
    """:class:`BranchDropout` for ``p > 0``, else ``nn.Identity`` (no op at all)."""
    return BranchDropout(p) if p > 0 else nn.Identity()
