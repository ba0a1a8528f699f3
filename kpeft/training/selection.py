"""Which checkpoint is "best": ``train.select_by`` = ``val_loss`` (default) or a validation metric
of the task (e.g. ``bleu_all`` on WebNLG, ``accuracy`` on GLUE), as the papers select; its
direction (higher or lower is better) follows from the metric's name."""

from __future__ import annotations

import math

# Metrics where lower is better (every other metric: higher is better).
LOWER_IS_BETTER = ("val_loss", "loss", "ter", "perplexity", "wer", "cer")


def lower_is_better(metric: str) -> bool:
    return any(metric == m or metric.startswith(m + "_") or metric.endswith("_" + m) for m in LOWER_IS_BETTER)


def mode(metric: str) -> str:
    """``min`` or ``max``."""
    return "min" if lower_is_better(metric) else "max"


def improves(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best` (None: nothing yet; a NaN never wins)."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if lower_is_better(metric) else value > best
