"""Records → the values of a table: per cell (row × task) the scores of its seeds, the failed
seeds, parameter percentages and per-example scores. Nothing but records is read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpeft.experiments.spec import Column, TableSpec, row_budget
from kpeft.records import iter_records

RunKey = tuple[str, str, str, str, int]  # task, model, method, budget, seed


@dataclass
class RowTask:
    """The runs of one row on one task."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed → complete record
    failed: dict[int, str] = field(default_factory=dict)  # seed → error message
    ignored: int = 0  # complete records whose config lacks the row's overrides

    def values(self, column: Column, split: str) -> list[float]:
        """The column's metric of every seed (× the column's scale)."""
        out = []
        for rec in self.records.values():
            v = (rec.get("metrics", {}).get(split) or {}).get(column.metric)
            if isinstance(v, (int, float)):
                out.append(float(v) * column.scale)
        return out

    def examples(self, column: Column, split: str) -> list[list[float]]:
        """Per seed, the per-example scores of `column` (seeds without the file are left out)."""
        if not column.example_score:
            return []
        out = []
        for rec in self.records.values():
            scores = example_scores(Path(rec["_dir"]), split, column.example_score, column.example_subset)
            if scores is not None:
                out.append([x * column.scale for x in scores])
        return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, _, value = item.lstrip("+").partition("=")
    return key, yaml.safe_load(value) if value else None


def _select(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def honours(record: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> bool:
    """Whether the record's resolved config has every ``key=value`` of `overrides`."""
    config = record.get("config") or {}
    for item in overrides:
        key, value = _parse_override(item)
        have = _select(config, key)
        if have is KeyError or have != value:
            return False
    return True


def load_runs(root: Path) -> dict[RunKey, dict[str, Any]]:
    """Every record below `root` by (task, model, method, budget, seed)."""
    runs = {}
    for path, rec in iter_records(root):
        try:
            key = (rec["task"], rec["model"], rec["method"], rec["budget"], int(rec["seed"]))
        except (KeyError, TypeError, ValueError):
            continue
        rec["_dir"] = str(path.parent)  # where it is now (the record's run_dir may be relative or moved)
        runs[key] = rec
    return runs


def collect(spec: TableSpec, model: str, runs: dict[RunKey, dict[str, Any]]) -> dict[tuple[int, int, str], RowTask]:
    """(group index, row index, task) → its runs, for every row and task of `spec`."""
    out = {}
    for gi, group in enumerate(spec.groups):
        for ri, row in enumerate(group.rows):
            budget = row_budget(group, row)
            for task in spec.tasks:
                cell = RowTask()
                for seed in task.seeds:
                    rec = runs.get((task.task, model, row.method, budget, seed))
                    if rec is None:
                        continue
                    if rec.get("status") == "complete":
                        if honours(rec, row.overrides):
                            cell.records[seed] = rec
                        else:
                            cell.ignored += 1
                    elif rec.get("status") == "failed":
                        cell.failed[seed] = str(rec.get("error", "failed"))
                out[(gi, ri, task.task)] = cell
    return out


def example_scores(run_dir: Path, split: str, field_name: str, subset: str | None = None) -> list[float] | None:
    """One run's per-example scores (``generations/<split>.jsonl`` of the NLG tasks, else
    ``predictions/<split>.jsonl``) in file order, or None when the run wrote none."""
    for folder in ("generations", "predictions"):
        path = run_dir / folder / f"{split}.jsonl"
        if path.exists():
            break
    else:
        return None
    scores = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if subset is not None and row.get("subset") != subset:
                continue
            value = row.get(field_name)
            if not isinstance(value, (int, float)):
                return None
            scores.append(float(value))
    return scores or None
