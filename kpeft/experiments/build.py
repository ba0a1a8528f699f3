"""A table's numbers from its runs: mean ± std per cell, the best value per group, and the
significance of each method against the best baseline of its group (p < ALPHA)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kpeft.experiments.collect import RowTask
from kpeft.experiments.columns import standard
from kpeft.experiments.provenance import mixed_provenance
from kpeft.experiments.spec import Column, TableSpec, TaskColumns, row_budget
from kpeft.experiments.stats import Summary, best_index, paired_bootstrap_p, summarize, welch_p

ALPHA = 0.05


@dataclass
class CellView:
    summary: Summary | None
    expected: int  # seeds the table asks for
    failed: int = 0
    bold: bool = False
    welch_p: float | None = None  # against the best baseline of the group
    bootstrap_p: float | None = None
    reference: bool = False  # this row is the best baseline of its group for this column
    differs: list[str] = field(default_factory=list)  # config keys in which the cell's runs differ

    @property
    def marks(self) -> str:
        out = ""
        if self.welch_p is not None and self.welch_p < ALPHA:
            out += "*"
        if self.bootstrap_p is not None and self.bootstrap_p < ALPHA:
            out += "†"
        if self.differs:
            out += "‡"
        return out


@dataclass
class RowView:
    group: str
    label: str
    method: str
    budget: str
    baseline: bool
    train_pct: float | None
    store_pct: float | None
    cells: list[CellView] = field(default_factory=list)


@dataclass
class ColumnView:
    task: str
    task_label: str
    column: Column


@dataclass
class TableView:
    spec: TableSpec
    model: str
    columns: list[ColumnView]
    rows: list[RowView]
    missing: list[str]  # "task method-budget seed S" of every run without a complete record
    failed: list[str]
    ignored: int  # complete records not counted (their config lacks the row's overrides, or another won)
    differs: list[str] = field(default_factory=list)  # "task method-budget: keys" of cells with mixed configs
    made_by: list[str] = field(default_factory=list)  # mixed code / lock versions among the records (footer)
    asked: int | None = None  # runs asked for, when not the spec's rows × tasks × seeds (tables of found records)

    @property
    def expected(self) -> int:
        if self.asked is not None:
            return self.asked
        return sum(len(t.seeds) for t in self.spec.tasks) * sum(len(g.rows) for g in self.spec.groups)


def only_found(table: TableView, runs: dict[tuple[int, int, str], RowTask], used: int) -> TableView:
    """A table of found records asks for exactly those: no missing runs but failed ones, and each
    cell's count is its own records."""
    keys = [(gi, ri) for gi, g in enumerate(table.spec.groups) for ri in range(len(g.rows))]
    for (gi, ri), row in zip(keys, table.rows):
        for cell, col in zip(row.cells, table.columns):
            rt = runs.get((gi, ri, col.task))
            if rt is not None:
                cell.expected = len(rt.records) + len(rt.failed)
    failed = {f.split(":", 1)[0] for f in table.failed}
    table.missing = [m for m in table.missing if m in failed]
    table.asked = used
    return table


def task_columns(task: TaskColumns) -> list[Column]:
    return list(task.columns) or standard(task.task)


def _pct(cells: list[RowTask], key: str) -> float | None:
    for cell in cells:
        for rec in cell.records.values():
            value = (rec.get("params") or {}).get(key)
            if isinstance(value, (int, float)):
                return float(value)
    return None


def build(spec: TableSpec, model: str, runs: dict[tuple[int, int, str], RowTask], n_boot: int = 1000) -> TableView:
    columns = [ColumnView(t.task, t.label or t.task, c) for t in spec.tasks for c in task_columns(t)]
    seeds = {t.task: len(t.seeds) for t in spec.tasks}
    rows, missing, failed, ignored, differs = [], [], [], 0, []
    for gi, group in enumerate(spec.groups):
        for ri, row in enumerate(group.rows):
            budget = row_budget(group, row)
            per_task = [runs[(gi, ri, t.task)] for t in spec.tasks]
            view = RowView(group.name, row.label or row.method, row.method, budget, row.baseline,
                           _pct(per_task, "trainable_pct"), _pct(per_task, "stored_pct"))
            for col in columns:
                rt = runs[(gi, ri, col.task)]
                view.cells.append(CellView(summarize(rt.values(col.column, spec.split)),
                                           seeds[col.task], len(rt.failed), differs=list(rt.differs)))
            for t, rt in zip(spec.tasks, per_task):
                ignored += rt.ignored
                if rt.differs:
                    differs.append(f"{t.task} {row.method}-{budget}: {', '.join(rt.differs)}")
                for seed in t.seeds:
                    if seed not in rt.records:
                        name = f"{t.task} {row.method}-{budget} seed {seed}"
                        missing.append(name)
                        if seed in rt.failed:
                            failed.append(f"{name}: {rt.failed[seed]}")
            rows.append(view)
    used = [rec for rt in runs.values() for rec in rt.records.values()]
    table = TableView(spec, model, columns, rows, missing, failed, ignored, differs,
                      made_by=mixed_provenance(used))
    _mark(table, runs, n_boot)
    if spec.average:
        _add_average(table)
    return table


def _group_slices(table: TableView) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    for i, row in enumerate(table.rows):
        out.setdefault(row.group, []).append(i)
    return list(out.values())


def _mark(table: TableView, runs: dict[tuple[int, int, str], RowTask], n_boot: int) -> None:
    """Bold the best mean of each group and column; test every row against the group's best
    baseline (Welch over seeds; paired bootstrap over examples where they were stored)."""
    spec = table.spec
    keys = [(gi, ri) for gi, g in enumerate(spec.groups) for ri in range(len(g.rows))]
    for members in _group_slices(table):
        for ci, col in enumerate(table.columns):
            c = col.column
            cells = [table.rows[i].cells[ci] for i in members]
            shown = [round(x.summary.mean, c.digits) if x.summary else None for x in cells]
            for j in best_index(shown, c.lower_is_better):
                cells[j].bold = True
            base = [j for j, i in enumerate(members) if table.rows[i].baseline
                    and cells[j].summary is not None]
            if not base:
                continue
            ref = best_index([cells[j].summary.mean for j in base], c.lower_is_better)[0]
            ref = base[ref]
            cells[ref].reference = True
            ref_runs = runs[(*keys[members[ref]], col.task)]
            ref_vals = ref_runs.values(c, spec.split)
            ref_examples = None
            for j, i in enumerate(members):
                if j == ref or cells[j].summary is None:
                    continue
                these = runs[(*keys[i], col.task)]
                cells[j].welch_p = welch_p(these.values(c, spec.split), ref_vals)
                if c.example_score:
                    if ref_examples is None:
                        ref_examples = _mean_examples(ref_runs.examples(c, spec.split))
                    mine = _mean_examples(these.examples(c, spec.split))
                    if mine is not None and ref_examples is not None and len(mine) == len(ref_examples):
                        cells[j].bootstrap_p = paired_bootstrap_p(mine, ref_examples, n_boot)


def _mean_examples(per_seed: list[list[float]]) -> np.ndarray | None:
    """Per-example scores averaged over the seeds (seeds must agree on the example count)."""
    if not per_seed or len({len(s) for s in per_seed}) != 1:
        return None
    return np.mean(np.asarray(per_seed, float), axis=0)


def _add_average(table: TableView) -> None:
    """An "Avg." column: per row, the mean over tasks of each task's first column (when every
    task has a value), bold per group."""
    firsts = [next(i for i, c in enumerate(table.columns) if c.task == t.task) for t in table.spec.tasks]
    avg_col = ColumnView("avg", "Avg.", Column("avg", "Avg."))
    table.columns.append(avg_col)
    for row in table.rows:
        means = [row.cells[i].summary.mean if row.cells[i].summary else None for i in firsts]
        summary = Summary(1, float(np.mean(means)), 0.0) if means and None not in means else None
        row.cells.append(CellView(summary, 1))
    for members in _group_slices(table):
        cells = [table.rows[i].cells[-1] for i in members]
        shown = [round(x.summary.mean, 2) if x.summary else None for x in cells]
        for j in best_index(shown):
            cells[j].bold = True
