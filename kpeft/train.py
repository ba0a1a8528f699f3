"""``python -m kpeft.train model=M method=X budget=B task=T seed=S [overrides]``: one run.

compose → build (backbone, task, method) → fit → evaluate the best checkpoint → write the record.
``-m`` sweeps (``method=lora,bitfit seed=1,2,3``); ``resume=true`` continues a killed run;
a run whose record exists is skipped unless ``force=true``. Multi-process:
``torchrun --nproc_per_node 2 -m kpeft.train ...`` (GPUs, or CPUs over gloo), or on GPUs
``accelerate launch --num_processes 2 -m kpeft.train ...``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model, load_tokenizer
from kpeft.compose import (
    apply_method_train,
    check_choices,
    check_method_fits_budget,
    check_unknown_keys,
    compose,
)
from kpeft.config import CONF_DIR, register_configs
from kpeft.errors import KpeftError, user_errors
from kpeft.methods import AdaptedModel, apply_method
from kpeft.records import is_complete, provenance, read_record, write_record
from kpeft.tasks import Task, task_class
from kpeft.training.loop import LoopState, Trainer, make_accelerator

log = logging.getLogger("kpeft.train")


def build(cfg: DictConfig) -> tuple[AdaptedModel, Task, dict[str, list]]:
    """The adapted backbone, the task, and its encoded splits."""
    cls = task_class(cfg.task)
    tokenizer = load_tokenizer(cfg.model) if cls.needs_tokenizer else None
    task = cls(cfg.task, tokenizer)
    model = load_model(cfg.model, task.head, num_labels=cfg.task.num_labels, seed=cfg.seed)
    if tokenizer is None:
        task.pad_token_id = model.config.pad_token_id or 0
    elif getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    if hasattr(task, "prepare_model"):  # NLG tasks: special-token embeddings (kpeft/tasks/nlg.py)
        task.prepare_model(adapted, cfg.fidelity)
    splits = task.load_splits()
    return adapted, task, splits


def seed_everything(seed: int, deterministic: bool) -> None:
    """Python, NumPy and torch (all devices) seeds; with `deterministic`, deterministic kernels
    where torch has them (a warning, not an error, for the few that have none)."""
    set_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _finite(x: float) -> float | None:
    return x if isinstance(x, float) and math.isfinite(x) else None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration end to end and return its record (or the existing one)."""
    run_dir = Path(cfg.run_dir)
    if is_complete(run_dir) and not cfg.force:
        log.info("skip: %s has a finished record (force=true re-runs it)", run_dir)
        return read_record(run_dir)
    check_unknown_keys(cfg)
    check_method_fits_budget(cfg)
    cfg = apply_method_train(cfg)
    if cfg.method.name == "zero_shot" and not cfg.train.eval_only:
        raise KpeftError("method=zero_shot trains nothing: add train.eval_only=true (or pick a method to train)")
    t0 = time.perf_counter()
    seed_everything(cfg.seed, cfg.train.deterministic)
    accelerator = make_accelerator(cfg.train)
    adapted, task, splits = build(cfg)
    adapted.model.to(accelerator.device)
    counts = adapted.count()
    log.info(
        "%s on %s/%s: %s trainable (%.2f%%), %s stored", cfg.method.name, cfg.model.name, cfg.task.name,
        f"{counts.trainable:,}", counts.trainable_pct, f"{counts.stored:,}",
    )
    trainer = Trainer(cfg, adapted, task, splits, run_dir, accelerator)
    metrics: dict[str, Any] = {}
    if cfg.train.eval_before_training:
        metrics["untrained"] = trainer.evaluate(cfg.split)
    state = LoopState() if cfg.train.eval_only else trainer.fit()
    trainer.load_best()
    metrics[cfg.split] = trainer.evaluate(cfg.split, save_examples=True)
    metrics["validation_loss"] = _finite(state.best_val_loss)
    record = {
        "status": "complete",
        "schema": 1,
        "run_dir": str(run_dir),
        "experiment": cfg.experiment,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "budget": cfg.budget.name,
        "seed": cfg.seed,
        "metric": cfg.task.metric,
        "score": metrics[cfg.split].get(cfg.task.metric),
        "metrics": metrics,
        "params": counts.as_dict(),
        "training": trainer.summary(state),
        "timing": {"train_seconds": round(state.train_seconds, 3), "wall_seconds": round(time.perf_counter() - t0, 3)},
        "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
        **provenance(),
    }
    if accelerator.is_main_process:
        path = write_record(run_dir, record, force=cfg.force)
        log.info("%s = %.2f  →  %s", cfg.task.metric, record["score"], path)
    accelerator.wait_for_everyone()
    return record


def write_failure(cfg: DictConfig, err: BaseException) -> Path | None:
    """A ``status: failed`` record (error, traceback tail) for a run of a sweep: not complete, so
    the next sweep retries it (resuming from its last checkpoint with ``resume=true``). A complete
    record is left alone (a failed ``force=true`` re-run keeps it)."""
    from accelerate import PartialState

    run_dir = Path(cfg.run_dir)
    if not PartialState().is_main_process or is_complete(run_dir):
        return None
    tail = "".join(traceback.format_exception(err)).splitlines()[-30:]
    record = {
        "status": "failed", "schema": 1, "run_dir": str(run_dir), "experiment": cfg.experiment,
        "task": cfg.task.name, "model": cfg.model.name, "method": cfg.method.name,
        "budget": cfg.budget.name, "seed": cfg.seed, "error": f"{type(err).__name__}: {err}",
        "traceback": tail, "config": _container(cfg), **provenance(),
    }
    return write_record(run_dir, record)


def _container(cfg: DictConfig) -> dict[str, Any]:
    """The config resolved where it can be (a failure may come from a value that cannot)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra app
        return False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job. In a sweep (``-m``) a failing run writes a failed record and the sweep goes on;
    a single run exits non-zero (a KpeftError in one line)."""
    sweeping = _in_multirun()
    try:
        record = run(cfg)
    except KpeftError as err:
        print(f"kpeft: error: {err}", file=sys.stderr)
        if not sweeping:
            sys.exit(2)
        write_failure(cfg, err)
        return None
    except Exception as err:  # e.g. out of memory: recorded, and the sweep goes on
        if not sweeping:
            raise
        log.exception("run failed: %s", cfg.run_dir)
        write_failure(cfg, err)
        return None
    return record.get("score")


def precheck(argv: list[str]) -> None:
    """Compose a single run once before Hydra does, so that a typo or a wrong type is reported in
    one line naming the key (Hydra's own report is longer). Sweeps are checked name by name."""
    check_choices(argv)
    if any(a in ("-m", "--multirun") for a in argv):
        return
    overrides = [a for a in argv if not a.startswith(("-", "hydra.", "hydra/"))]
    compose(overrides)


@user_errors
def main() -> None:
    register_configs()
    precheck(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
