"""Benchmarks: one module per task family; ``build_task`` picks the class by task name."""

from __future__ import annotations

from omegaconf import DictConfig

from kpeft.errors import KpeftError
from kpeft.tasks.base import IGNORE, Task
from kpeft.tasks.cnndm import CNNDM
from kpeft.tasks.coqa import CoQA
from kpeft.tasks.e2e import E2E
from kpeft.tasks.glue import Glue
from kpeft.tasks.synthetic import DemoReverse, DemoSentiment
from kpeft.tasks.text2text import GlueText2Text, text2text_format
from kpeft.tasks.webnlg import WebNLG

TASKS: dict[str, type[Task]] = {
    "demo_sentiment": DemoSentiment,
    "demo_reverse": DemoReverse,
    "demo_reverse_s2s": DemoReverse,
    # the paper benchmarks (official files or the hub; official scorers: python -m kpeft.score)
    "webnlg": WebNLG,
    "coqa": CoQA,
    "cnndm": CNNDM,
    "e2e": E2E,
    **{f"glue_{t}": Glue for t in ("sst2", "mnli", "cola", "rte", "mrpc", "stsb", "qnli", "qqp")},
}


def task_class(cfg: DictConfig) -> type[Task]:
    cls = TASKS.get(cfg.name)
    if cls is None:
        raise KpeftError(f"task '{cfg.name}' has no implementation; known tasks: {', '.join(sorted(TASKS))}")
    if cls is Glue and text2text_format(cfg.options):  # GLUE on T5: text-to-text (kpeft/tasks/text2text.py)
        return GlueText2Text
    return cls


__all__ = ["Task", "TASKS", "task_class", "IGNORE"]
