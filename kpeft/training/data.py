"""Deterministic, resumable, data-parallel batching.

The order of an epoch depends only on (seed, epoch), never on the global RNG, so a resumed run
sees exactly the batches an uninterrupted run would. An optimizer step consumes one *global*
batch: ``grad_accum`` micro-batches on each of ``world`` processes; rank r takes every world-th
example of each global batch, so 1 process × batch B and 2 processes × B/2 see the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Optimizer steps of one epoch; the last, smaller global batch is kept."""
    return (n + global_batch - 1) // global_batch


def step_batches(
    examples: Sequence[Any],
    order: list[int],
    step: int,
    global_batch: int,
    grad_accum: int,
    rank: int,
    world: int,
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of optimizer step `step` (0-based within the epoch) for this rank."""
    chunk = order[step * global_batch : (step + 1) * global_batch]
    micro = (len(chunk) + grad_accum - 1) // grad_accum
    out = []
    for a in range(grad_accum):
        part = chunk[a * micro : (a + 1) * micro][rank::world]
        if part:
            out.append(collate([examples[i] for i in part]))
    return out


def eval_batches(
    examples: Sequence[Any], batch_size: int, rank: int, world: int, collate: Callable
) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches of this rank's share (every world-th example)."""
    mine = list(range(rank, len(examples), world))
    for i in range(0, len(mine), batch_size):
        yield collate([examples[j] for j in mine[i : i + batch_size]])
