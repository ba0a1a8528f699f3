"""The layout of a paper table, as a preset declares it under ``hydra.sweeper.table``.

A table is groups of rows (a method at a budget: the papers group methods by parameter budget)
× tasks (each with its number of seeds and its metric columns). The same spec drives the sweep
(:mod:`hydra_plugins.kpeft_sweeper` runs every row × task × seed) and the table
(:mod:`kpeft.tables`). Presets without a spec (``nlu_mini``, ``demo``) get one inferred from
their records (:func:`infer_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Column:
    """One metric column of a task."""

    metric: str  # key of the record's metrics[split], e.g. bleu_all
    label: str = ""  # header; default: the metric key
    lower_is_better: bool = False  # TER
    digits: int = 2
    scale: float = 1.0  # shown as value × scale (E2E's fractions as the papers' percentages)
    # Per-example field for the paired bootstrap (generations/ or predictions/<split>.jsonl),
    # restricted to rows whose "subset" equals example_subset (WebNLG seen / unseen); null: none.
    example_score: str | None = None
    example_subset: str | None = None


@dataclass
class TaskColumns:
    """A task of the table: its runs (one per seed) and its columns."""

    task: str  # conf/task name
    label: str = ""  # header; default: the task name
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    columns: list[Column] = field(default_factory=list)  # empty: kpeft.experiments.columns.standard


@dataclass
class Row:
    """A method at a budget. ``overrides`` are extra settings of this row only (checked against
    each record's resolved config, so a run made without them is not counted)."""

    method: str
    label: str = ""  # e.g. "LoRA-4"; default: the method name
    budget: str | None = None  # default: the group's
    baseline: bool = True  # false: a method the paper proposes (tested against the best baseline)
    overrides: list[str] = field(default_factory=list)
    paper: list[str] = field(default_factory=list)  # printed values, one per column (kind: bench)


@dataclass
class Group:
    """Rows sharing a parameter budget (a block of the paper's table)."""

    name: str
    budget: str
    rows: list[Row] = field(default_factory=list)


@dataclass
class TableSpec:
    title: str = ""
    source: str = ""  # e.g. "[KM] Table 1"
    split: str = "test"
    tasks: list[TaskColumns] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    average: bool = False  # add an "Avg." column: the mean of each task's first column (KronA)
    kind: str = "runs"  # runs | bench (a table of `python -m kpeft.bench`, e.g. KronA Table 2)
    bench_file: str = "results/bench/*.json"  # kind bench: the newest matching result is used
    note: str = ""  # a footnote printed under the table


@dataclass(frozen=True)
class Cell:
    """One run of a table: row × task × seed."""

    group: int
    row: int
    task: str
    seed: int
    method: str
    budget: str
    overrides: tuple[str, ...] = ()

    def as_overrides(self) -> list[str]:
        return [f"task={self.task}", f"method={self.method}", f"budget={self.budget}", f"seed={self.seed}",
                *self.overrides]


def row_budget(group: Group, row: Row) -> str:
    return row.budget or group.budget


def cells(spec: TableSpec) -> list[Cell]:
    """Every run of the table, seed-major (seed 1 of every row and task first, so that a table
    still being filled has every row), then task, group and row order."""
    out = []
    for i in range(max((len(t.seeds) for t in spec.tasks), default=0)):
        for task in spec.tasks:
            if i >= len(task.seeds):
                continue
            seed = task.seeds[i]
            for gi, group in enumerate(spec.groups):
                for ri, row in enumerate(group.rows):
                    out.append(Cell(gi, ri, task.task, seed, row.method, row_budget(group, row),
                                    tuple(row.overrides)))
    return out


def infer_spec(experiment: str, budget: str, tasks: list[str], found: list[tuple[str, str, str, int]],
               method_order: list[str] = ()) -> TableSpec:
    """A spec for a preset that declares none: one group per budget, rows = the methods of its
    ``method_train`` (in order) and any other method with records, seeds = those of the records.
    `found` holds (task, method, budget, seed) of the records."""
    budgets = [budget] + sorted({b for _, _, b, _ in found} - {budget})
    task_names = list(dict.fromkeys([*tasks, *sorted({t for t, *_ in found})]))
    groups = []
    for b in budgets:
        methods = list(method_order) if b == budget else []
        methods += sorted({m for _, m, bb, _ in found if bb == b} - set(methods))
        if methods:
            groups.append(Group(name=b, budget=b, rows=[Row(method=m) for m in methods]))
    task_cols = []
    for t in task_names:
        seeds = sorted({s for tt, _, _, s in found if tt == t})
        task_cols.append(TaskColumns(task=t, seeds=seeds))
    return TableSpec(title=experiment, tasks=task_cols, groups=groups)
