"""A table of whatever records were found (no preset layout): ``python -m kpeft.tables DIR_OR_GLOB``
and ``experiment=NAME`` for experiments without a declared table.

Rows are the distinct values of ``rows`` (default ``method,budget``: the first field labels the
row, the others name its group), columns the distinct values of ``cols`` (default ``task``), seeds
the records' own. A field is a record's top-level key (task, model, method, budget, experiment) or
a dotted key of its resolved config (``train.lr``). Only rows and cells with records exist, and the
run count is the records found; ``baseline`` names the rows (their first field's value) the others
are tested against.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kpeft.errors import KpeftError
from kpeft.experiments.collect import RowTask, _choose
from kpeft.experiments.columns import standard
from kpeft.experiments.spec import Column, Group, Row, TableSpec, TaskColumns
from kpeft.records import RECORD_NAME, iter_records, read_record
from kpeft.training.selection import lower_is_better


def find_records(sources: Sequence[str]) -> list[dict[str, Any]]:
    """The records under each directory or matching each glob (of run directories or record files)."""
    paths: dict[Path, None] = {}
    for source in sources:
        matches = [Path(p) for p in sorted(glob.glob(source, recursive=True))] or [Path(source)]
        for match in matches:
            if match.is_dir():
                paths.update(dict.fromkeys(p for p, _ in iter_records(match)))
            elif match.name == RECORD_NAME and match.is_file():
                paths[match] = None
    out = []
    for path in paths:
        rec = read_record(path)
        if rec is not None and rec.get("kind", "run") == "run":
            rec["_dir"] = str(path.parent)
            out.append(rec)
    return out


def field(record: dict[str, Any], key: str) -> str | None:
    """A record's value of `key` (top-level, else a dotted config key) as text; None if absent."""
    if key in record and not isinstance(record[key], (dict, list)):
        return str(record[key])
    node: Any = record.get("config") or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if isinstance(node, dict) else str(node)


def _columns(name: str, task: str, metrics: Sequence[str]) -> list[Column]:
    if metrics:
        return [Column(m, m, lower_is_better=lower_is_better(m)) for m in metrics]
    return standard(task)


def found_table(records: Iterable[dict[str, Any]], rows: Sequence[str] = ("method", "budget"),
                cols: Sequence[str] = ("task",), baseline: Sequence[str] = (), metrics: Sequence[str] = (),
                title: str = "", split: str = "test") -> tuple[TableSpec, dict[tuple[int, int, str], RowTask], int]:
    """(the spec, its runs by (group, row, column), the number of records used)."""
    cells: dict[tuple[tuple[str, ...], tuple[str, ...], int], list[dict]] = {}
    tasks: dict[tuple[str, ...], str] = {}
    for rec in records:
        row = tuple(field(rec, k) or "?" for k in rows)
        col = tuple(field(rec, k) or "?" for k in cols)
        try:
            seed = int(rec["seed"])
        except (KeyError, TypeError, ValueError):
            continue
        cells.setdefault((row, col, seed), []).append(rec)
        tasks.setdefault(col, str(rec.get("task", "?")))
    if not cells:
        raise KpeftError("no run records found; pass a run directory or a glob of them (e.g. "
                         "'results/runs/mine'), or run the sweep first")
    chosen = {key: _choose(recs, ()) for key, recs in cells.items()}
    row_keys = sorted({r for r, _, _ in chosen}, key=lambda r: (r[1:], r[0] not in baseline, r[0]))
    col_keys = sorted({c for _, c, _ in chosen})
    groups: dict[tuple[str, ...], Group] = {}
    index: dict[tuple[str, ...], tuple[int, int]] = {}
    for r in row_keys:
        name = " ".join(r[1:]) or "all"
        group = groups.setdefault(r[1:], Group(name=name, budget=r[1] if len(r) > 1 and rows[1] == "budget" else ""))
        index[r] = (list(groups).index(r[1:]), len(group.rows))
        group.rows.append(Row(method=r[0], label=r[0], budget=group.budget or name, baseline=r[0] in baseline))
    spec = TableSpec(title=title, split=split, groups=list(groups.values()))
    for c in col_keys:
        name = " ".join(c)
        seeds = sorted({s for _, cc, s in chosen if cc == c})
        spec.tasks.append(TaskColumns(task=name, label=name, seeds=seeds, columns=_columns(name, tasks[c], metrics)))
    runs = {(gi, ri, " ".join(c)): RowTask() for r, (gi, ri) in index.items() for c in col_keys}
    used = 0
    for (r, c, seed), (rec, left_out) in chosen.items():
        cell = runs[(*index[r], " ".join(c))]
        cell.ignored += left_out
        if rec is None:
            continue
        used += 1
        if rec.get("status") == "complete":
            cell.records[seed] = rec
        else:
            cell.failed[seed] = str(rec.get("error", "failed"))
    return spec, runs, used
