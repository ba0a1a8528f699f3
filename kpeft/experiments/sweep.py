"""Resumable table sweeps: which runs of a table a multirun launches, and how they ended.

The kpeft sweeper (``hydra_plugins/kpeft_sweeper``) turns a preset's table into one Hydra job
per row × task × seed. Command-line values of ``task``, ``method``, ``budget`` and ``seed``
(``seed=1,2``) keep only the matching runs; every other override goes to every job. A run whose
record is complete *for its config* is not launched again (unless ``force=true``; a record of
another config is launched and refused in one line, docs/runs.md); an interrupted one restarts
from its last checkpoint (the presets set ``resume: true``); a failed one has a ``failed``
record and is retried by the next sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from kpeft.errors import KpeftError
from kpeft.experiments.spec import Cell, TableSpec, cells
from kpeft.records import read_record
from kpeft.runid import difference, semantic

FILTER_KEYS = ("task", "method", "budget", "seed")


def split_arguments(arguments: Sequence[str]) -> tuple[dict[str, set[str]], list[str]]:
    """(filters on the table's runs, overrides passed to every job)."""
    filters: dict[str, set[str]] = {}
    rest = []
    for item, override in zip(arguments, OverridesParser.create().parse_overrides(list(arguments))):
        key = override.get_key_element()
        if key in FILTER_KEYS:
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
            filters[key] = {str(v) for v in values}
        elif override.is_sweep_override():
            raise KpeftError(f"'{item}': a table sweep runs each row once per task and seed; sweep "
                             f"only {', '.join(FILTER_KEYS)} (to choose runs), or run this key's values one by one")
        else:
            rest.append(item)
    return filters, rest


def select(spec: TableSpec, filters: dict[str, set[str]]) -> list[Cell]:
    """The table's runs that every filter admits, in sweep order (seed-major)."""
    return [c for c in cells(spec) if all(str(getattr(c, key)) in allowed for key, allowed in filters.items())]


@dataclass
class Job:
    cell: Cell
    overrides: list[str]
    run_dir: Path
    done: bool  # a complete record of this config exists and force is off
    config: DictConfig | None = None  # the job's composed config (its `hydra` node included)


def plan(spec: TableSpec, arguments: Sequence[str], compose: Callable[[list[str]], DictConfig]) -> list[Job]:
    """Every selected run with its job overrides and whether it is already done (`compose`
    resolves a job's config, i.e. its run directory)."""
    filters, rest = split_arguments(arguments)
    jobs = []
    for cell in select(spec, filters):
        overrides = [*rest, *cell.as_overrides()]
        cfg = compose(overrides)
        run_dir = Path(cfg.run_dir)
        rec = read_record(run_dir)
        done = rec is not None and rec.get("status") == "complete" and not cfg.force and same_config(cfg, rec)
        jobs.append(Job(cell, overrides, run_dir, done, cfg))
    return jobs


def same_config(cfg: DictConfig, record: dict) -> bool:
    """Whether a record holds `cfg`'s semantic config (keys the record lacks are not counted)."""
    job = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    now = semantic(OmegaConf.to_container(job, resolve=True, throw_on_missing=False))
    return not difference(now, semantic(record.get("config") or {}), common_only=True)


def outcome(jobs: Sequence[Job]) -> dict[str, list[Job]]:
    """Jobs by the status of their record now: complete, failed, or missing (killed, or on a
    launcher that has not finished)."""
    out: dict[str, list[Job]] = {"complete": [], "failed": [], "missing": []}
    for job in jobs:
        rec = read_record(job.run_dir)
        status = rec.get("status") if rec else None
        out[status if status in ("complete", "failed") else "missing"].append(job)
    return out


def record_lost(jobs: Sequence[Job], error: str) -> list[Job]:
    """After a launch: a ``failed`` record for each job that ended without a record (its process
    died: killed, out of memory, a cluster's time limit), so that the table counts it and the next
    sweep retries it. A directory that a live process holds (kpeft/runlock.py) is left alone.
    Returns the jobs so recorded."""
    from kpeft.records import failed_record, write_record
    from kpeft.runlock import RunLock, RunLocked

    lost = []
    for job in jobs:
        if job.config is None or read_record(job.run_dir) is not None:
            continue
        lock = RunLock(job.run_dir)
        try:
            lock.acquire()
        except RunLocked:
            continue
        try:
            cfg = OmegaConf.masked_copy(job.config, [k for k in job.config.keys() if k != "hydra"])
            write_record(job.run_dir, failed_record(cfg, error, []))
            lost.append(job)
        finally:
            lock.release()
    return lost


def describe(job: Job) -> str:
    c = job.cell
    return f"{c.task} {c.method}-{c.budget} seed {c.seed}"
