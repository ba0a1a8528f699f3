"""Clocks, interleaved repeats and peak memory.

* Time: CUDA events (and a synchronise) on GPUs; on CPU ``time.perf_counter`` (wall) or
  ``time.process_time`` (this process's CPU time: robust to other processes' load when torch
  runs one thread).
* Repeats are **round-robin**: every repeat times each callable once, in an order rotated by one
  each repeat, so a burst of load from other processes hits all of them alike; medians are
  reported.
* Peak memory of one call, above what was allocated before it: ``torch.cuda.max_memory_allocated``
  on GPUs; on CPU the allocator's own records, through the profiler (``profile_memory=True``
  reports every allocation and free of the CPU allocator; their running sum's maximum is the peak).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile


class Clock:
    """Seconds taken by a callable on `device`: CUDA events on GPUs; on CPU wall time
    (``kind="wall"``) or this process's CPU time (``kind="cpu"``: with one thread, time the
    process spent computing, which other processes' load does not inflate)."""

    def __init__(self, device: torch.device, kind: str = "wall"):
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock must be wall or cpu, not {kind!r}")
        self.cuda = device.type == "cuda"
        self.kind = "cuda-events" if self.cuda else kind
        self._now = time.process_time if kind == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = self._now()
        fn()
        return self._now() - t0


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, clock: Clock, warmup: int = 0) -> dict[str, list[float]]:
    """Times of `repeats` calls of every callable, interleaved (see the module docstring)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(clock(fns[name]))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items() if ts}


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The peak of memory allocated while `fn` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    peak = running = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes that persist between steps: parameters, buffers, optimizer state and what components
    keep besides (``resident_tensors()``, e.g. SAID's random projection); each storage once (tied
    weights count once)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() if hasattr(m, "resident_tensors") for t in m.resident_tensors()]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    seen: dict[int, int] = {}
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
    return sum(seen.values())
