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

# Examples sorted together by length_grouped_order: this many global batches (transformers'
# LengthGroupedSampler uses the same 50).
MEGABATCH = 50


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_order(lengths: Sequence[int], seed: int, epoch: int, global_batch: int) -> list[int]:
    """A permutation of the examples (the same set every epoch) whose consecutive global batches hold
    examples of similar length, so that a batch pads little: the epoch's random order is cut into
    groups of :data:`MEGABATCH` global batches, each group sorted by length (longest first), then
    the order of its batches is shuffled (the same (seed, epoch) always gives the same order)."""
    order = epoch_order(len(lengths), seed, epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    size = MEGABATCH * global_batch
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        group = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [group[i : i + global_batch] for i in range(0, len(group), global_batch)]
    # Only full batches move: the last, smaller one stays last (steps_per_epoch counts it there).
    full = len(order) // global_batch
    moved = torch.randperm(full, generator=g).tolist()
    return [i for b in moved for i in batches[b]] + [i for b in batches[full:] for i in b]


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch: int) -> float:
    """The share of pad tokens in right-padded batches of `batch` consecutive examples of `order`."""
    real = padded = 0
    for start in range(0, len(order), batch):
        chunk = [lengths[i] for i in order[start : start + batch]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1.0 - real / padded if padded else 0.0


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
