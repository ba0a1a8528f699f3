"""The kpeft sweeper: a Hydra multirun over the runs of a paper table (``hydra/sweeper=kpeft``).

A table preset (``conf/experiment/<table>.yaml``) selects it and declares its runs under
``hydra.sweeper.table`` (groups of rows = method × budget, tasks with their seeds). One job per
row × task × seed goes to whichever launcher is configured (the sequential default,
``hydra/launcher=joblib``, ``hydra/launcher=submitit_slurm``); runs whose record is complete are
not launched again. See :mod:`kpeft.experiments.sweep`.
"""

# No `from __future__ import annotations`: Hydra's plugin scanner runs this module before it is in
# sys.modules, where dataclasses cannot resolve string annotations.
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from kpeft.experiments.spec import TableSpec

log = logging.getLogger("kpeft.sweep")


@dataclass
class KpeftSweeperConf:
    _target_: str = "hydra_plugins.kpeft_sweeper.KpeftSweeper"
    max_batch_size: int | None = None  # jobs handed to the launcher at once (None: all)
    dry_run: bool = False  # list the runs (complete or to run) and launch nothing
    table: TableSpec | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="kpeft", node=KpeftSweeperConf, provider="kpeft")


class KpeftSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, dry_run: bool = False, table: Any = None) -> None:
        self.max_batch_size = max_batch_size
        self.dry_run = dry_run
        self.table = table
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from kpeft.errors import KpeftError
        from kpeft.experiments.sweep import describe, outcome, plan, record_lost

        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        if self.table is None:
            print("kpeft: error: hydra/sweeper=kpeft needs a table (hydra.sweeper.table); "
                  "choose a table preset, e.g. experiment=km_table1", file=sys.stderr)
            sys.exit(2)
        spec = OmegaConf.to_object(self.table) if OmegaConf.is_config(self.table) else self.table
        if spec.kind == "bench":
            print(f"kpeft: error: {self.config.experiment} is a table of `python -m kpeft.bench`, not of "
                  f"training runs: run the bench (make {self.config.experiment.replace('_', '-')} RUN=1)",
                  file=sys.stderr)
            sys.exit(2)
        loader = self.hydra_context.config_loader
        try:
            jobs = plan(spec, arguments, lambda ov: loader.load_sweep_config(self.config, ov))
        except KpeftError as err:
            print(f"kpeft: error: {err}", file=sys.stderr)
            sys.exit(2)
        todo = [j for j in jobs if not j.done]
        log.info("%s: %d runs selected, %d already complete (skipped), %d to run",
                 self.config.experiment, len(jobs), len(jobs) - len(todo), len(todo))
        if self.dry_run:
            for job in jobs:
                print(f"{'complete' if job.done else 'to run  '}  {' '.join(job.overrides)}")
            return []
        sweep_dir = Path(self.config.hydra.sweep.dir)  # as Hydra's basic sweeper: the sweep's config
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        size = self.max_batch_size or max(len(todo), 1)
        returns, error = [], "the job ended without writing a record (see its log under hydra.sweep.dir)"
        for start in range(0, len(todo), size):
            batch = [j.overrides for j in todo[start:start + size]]
            try:
                returns.append(self.launcher.launch(batch, initial_job_idx=start))
            except Exception as err:  # e.g. a joblib worker or a submitit job died: the others' records stand
                log.error("the launcher lost jobs of this batch: %s: %s", type(err).__name__, err)
                error = f"lost by the launcher: {type(err).__name__}: {str(err)[:500]}"
        for job in record_lost(todo, error):
            log.error("%s: %s", describe(job), error)
        ended = outcome(todo)
        bad = ended["failed"] + ended["missing"]
        log.info("%s: %d complete, %d failed, %d without a record", self.config.experiment,
                 len(ended["complete"]), len(ended["failed"]), len(ended["missing"]))
        if bad:
            names = "; ".join(describe(j) for j in bad[:5]) + (" …" if len(bad) > 5 else "")
            print(f"kpeft: error: {len(bad)} of {len(todo)} runs did not complete ({names}); their "
                  "records say why; the same command retries them", file=sys.stderr)
            sys.exit(1)
        return returns
