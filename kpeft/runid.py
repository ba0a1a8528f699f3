"""Run identity: which part of a config decides what a run computes ("semantic"), and the run
directory suffix of a run whose semantic config differs from its preset's (docs/runs.md).

The semantic config is the resolved root config without the keys of :data:`NON_SEMANTIC` (where
things are written or read from, how the run is driven and displayed) and without the budget's
sizes (a method reads its sizes from the budget by interpolation, so the resolved ``method``
already holds the ones that matter). Two runs with equal semantic configs compute the same thing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Dotted keys (and whole subtrees) that never change what a run computes.
NON_SEMANTIC: tuple[str, ...] = (
    "output_root", "run_dir", "run_id", "run_overrides", "force", "resume",  # where and whether to write
    "logger",  # csv / wandb reporting
    "method_train", "method_overrides", "task_overrides",  # preset tables: applied into train/method/task
    "train.progress", "train.num_workers", "train.checkpoint_every_steps", "train.crash_after_steps",
    "train.eval_batch_size",  # as kpeft/training/checkpoint.py VOLATILE_KEYS
    "task.data_dir", "model.name_or_path", "model.cache_dir",  # where the data and weights are read from
    "budget",  # all sizes of all methods; the method's own are in the resolved `method`
)
# Kept from the non-semantic subtrees above: the budget's name is part of a run's identity.
KEPT: tuple[str, ...] = ("budget.name", "budget.target")  # budget=match: the target sizes the method
# Free-text keys, at any depth.
TEXT_KEYS: frozenset[str] = frozenset({"description"})
OVERRIDES_FILE = "overrides.txt"


def inert(key: str) -> bool:
    """Whether overriding `key` cannot change the semantic config (unlike the non-semantic tables and
    budget, whose values reach ``train``/``method``/``task``)."""
    return _excluded(key) and not key.startswith(("method_train", "method_overrides", "task_overrides", "budget"))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``; lists are leaves."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, full))
        else:
            out[full] = dict(value) if isinstance(value, Mapping) else value
    return out


def _excluded(key: str) -> bool:
    if key in KEPT or any(key.startswith(k + ".") for k in KEPT):
        return False
    if key.rsplit(".", 1)[-1] in TEXT_KEYS:
        return True
    return any(key == k or key.startswith(k + ".") for k in NON_SEMANTIC)


def semantic(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened semantic part of a resolved config (a plain dict, e.g. a record's)."""
    return {k: v for k, v in flatten(config).items() if not _excluded(k)}


def difference(current: Mapping[str, Any], other: Mapping[str, Any], common_only: bool = False) -> list[str]:
    """The semantic keys whose values differ between two flattened semantic configs; with
    `common_only`, keys that one of them lacks are left out (a record older than a config field)."""
    keys = set(current) & set(other) if common_only else set(current) | set(other)
    return sorted(k for k in keys if current.get(k, KeyError) != other.get(k, KeyError))


def run_suffix(changed: Mapping[str, Any]) -> str:
    """``""`` for a run with its preset's config, else ``-`` + 8 hex digits of the difference."""
    if not changed:
        return ""
    text = json.dumps(sorted(changed.items()), default=str, separators=(",", ":"))
    return "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def override_lines(changed: Mapping[str, Any]) -> list[str]:
    """``key=value`` lines (values as JSON) of a run's semantic difference from its preset."""
    return [f"{k}={json.dumps(v, default=str)}" for k, v in sorted(changed.items())]


def write_overrides(run_dir: Path, lines: Iterable[str]) -> None:
    """``overrides.txt``: what makes this run differ from its preset (nothing for a preset run)."""
    lines = list(lines)
    path = Path(run_dir) / OVERRIDES_FILE
    if lines:
        path.write_text("\n".join(lines) + "\n")
    else:
        path.unlink(missing_ok=True)
