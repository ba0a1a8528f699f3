"""Records → the values of a table: per cell (row × task) the scores of its seeds, the failed
seeds, parameter percentages and per-example scores. Nothing but records is read.

Runs are grouped by what actually ran: a (task, model, method, budget, seed) can have several
records (run directories of different configs, docs/runs.md); a cell takes, per seed, the one
honouring the row's overrides with the fewest other differences from the preset, and flags
(``differs``) the semantic keys in which its seeds' configs differ."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpeft.experiments.spec import Column, TableSpec, row_budget
from kpeft.records import iter_records
from kpeft.runid import difference, semantic

RunKey = tuple[str, str, str, str, int]  # task, model, method, budget, seed


@dataclass
class RowTask:
    """The runs of one row on one task."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed → complete record
    failed: dict[int, str] = field(default_factory=dict)  # seed → error message
    ignored: int = 0  # complete records not used (their config lacks the row's overrides, or another one won)
    differs: list[str] = field(default_factory=list)  # semantic keys in which the seeds' configs differ

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


def load_runs(root: Path) -> dict[RunKey, list[dict[str, Any]]]:
    """Every record below `root` by (task, model, method, budget, seed); one key can have several
    records (run directories of different configs)."""
    runs: dict[RunKey, list[dict[str, Any]]] = {}
    for path, rec in iter_records(root):
        try:
            key = (rec["task"], rec["model"], rec["method"], rec["budget"], int(rec["seed"]))
        except (KeyError, TypeError, ValueError):
            continue
        rec["_dir"] = str(path.parent)  # where it is now (the record's run_dir may be relative or moved)
        runs.setdefault(key, []).append(rec)
    return runs


def _choose(records: list[dict[str, Any]], overrides: list[str] | tuple[str, ...]) -> tuple[dict | None, int]:
    """(the complete record of a seed for a row, how many complete records were left out). A record
    honouring the row's overrides with the fewest differences from its preset wins (the newest on a
    tie); else a failed record, if any."""
    complete = [r for r in records if r.get("status") == "complete"]
    fitting = [r for r in complete if honours(r, overrides)]
    if fitting:
        newest_first = sorted(fitting, key=lambda r: str(r.get("created", "")), reverse=True)
        best = min(newest_first, key=lambda r: len(r.get("overrides") or []))
        return best, len(complete) - 1
    failed = [r for r in records if r.get("status") == "failed"]
    return (failed[-1] if failed else None), len(complete)


def _seed_free(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's semantic config without its seed and the values that follow it (e.g. SAID's seed)."""
    seed = rec.get("seed")
    return {k: v for k, v in semantic(rec.get("config") or {}).items() if k != "seed" and v != seed}


def config_differences(records: list[dict[str, Any]]) -> list[str]:
    """The semantic keys whose values differ among `records` (keys one of them lacks are ignored)."""
    configs = [_seed_free(r) for r in records]
    return sorted({k for c in configs[1:] for k in difference(configs[0], c, common_only=True)})


def collect(spec: TableSpec, model: str, runs: dict[RunKey, list[dict[str, Any]]]) -> dict[tuple[int, int, str], RowTask]:
    """(group index, row index, task) → its runs, for every row and task of `spec`."""
    out = {}
    for gi, group in enumerate(spec.groups):
        for ri, row in enumerate(group.rows):
            budget = row_budget(group, row)
            for task in spec.tasks:
                cell = RowTask()
                for seed in task.seeds:
                    rec, left_out = _choose(runs.get((task.task, model, row.method, budget, seed), []), row.overrides)
                    cell.ignored += left_out
                    if rec is None:
                        continue
                    if rec.get("status") == "complete":
                        cell.records[seed] = rec
                    else:
                        cell.failed[seed] = str(rec.get("error", "failed"))
                cell.differs = config_differences(list(cell.records.values()))
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
