"""Benchmarks: one module per task family; ``build_task`` picks the class by task name."""

from __future__ import annotations

from omegaconf import DictConfig

from kpeft.errors import KpeftError
from kpeft.tasks.base import IGNORE, Task
from kpeft.tasks.synthetic import DemoReverse, DemoSentiment

TASKS: dict[str, type[Task]] = {
    "demo_sentiment": DemoSentiment,
    "demo_reverse": DemoReverse,
    "demo_reverse_s2s": DemoReverse,
}


def task_class(cfg: DictConfig) -> type[Task]:
    cls = TASKS.get(cfg.name)
    if cls is None:
        raise KpeftError(f"task '{cfg.name}' has no implementation; known tasks: {', '.join(sorted(TASKS))}")
    return cls


__all__ = ["Task", "TASKS", "task_class", "IGNORE"]
