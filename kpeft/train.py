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

from kpeft import datafiles
from kpeft.backbones import describe
from kpeft.backbones.loading import load_model, load_tokenizer
from kpeft.compose import check_choices, check_method_fits_budget, check_unknown_keys, compose
from kpeft.config import CONF_DIR, register_configs
from kpeft.errors import KpeftError, user_errors
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.vocabulary import add_vocabulary_rows
from kpeft.paths import check_writable_dir
from kpeft.records import complete_record, failed_record, is_complete, read_record, write_record
from kpeft.runid import difference, semantic, write_overrides
from kpeft.runlock import RunLock, RunLocked, clean_tmp
from kpeft.tasks import Task, task_class
from kpeft.tasks.lengths import max_positions
from kpeft.training.beam import DecodeSettings
from kpeft.training.encoded_cache import encoded_splits
from kpeft.training.loop import LoopState, Trainer, make_accelerator
from kpeft.validate import check_config

log = logging.getLogger("kpeft.train")


def build(cfg: DictConfig) -> tuple[AdaptedModel, Task, dict[str, list]]:
    """The adapted backbone, the task, and its encoded splits."""
    adapted, task = build_model(cfg)
    splits = encoded_splits(task, cfg.task)  # encoded once per sweep (kpeft/training/encoded_cache.py)
    return adapted, task, splits


def build_model(cfg: DictConfig) -> tuple[AdaptedModel, Task]:
    """The adapted backbone and the task encoder (no data read; kpeft.api.load_run uses it too)."""
    cls = task_class(cfg.task)
    tokenizer = load_tokenizer(cfg.model) if cls.needs_tokenizer else None
    task = cls(cfg.task, tokenizer)
    task.decoding = DecodeSettings.from_config(cfg.get("decode"))
    model = load_model(cfg.model, task.head, num_labels=cfg.task.num_labels, seed=cfg.seed)
    if tokenizer is None:
        task.pad_token_id = model.config.pad_token_id or 0
    elif getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    task.max_positions = max_positions(model.config)  # inputs are fitted to them (kpeft/tasks/lengths.py)
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    adapt_to_task(adapted, task, cfg.fidelity)
    return adapted, task


def adapt_to_task(adapted: AdaptedModel, task: Task, fidelity: str = "paper") -> None:
    """What the task declares the model needs, after the method: rows for its new tokens (the NLG
    task embeddings, :mod:`kpeft.methods.vocabulary`)."""
    tokens = task.new_tokens()
    if tokens is not None:
        add_vocabulary_rows(adapted, tokens.first, tokens.total, tokens.token_types, fidelity)


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


def existing_record(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The finished record of this configuration, or None (none, or ``force=true``). A finished
    record of another semantic config (a preset or a default changed since) is an error: never
    return another configuration's results."""
    rec = read_record(run_dir)
    if cfg.force or rec is None or rec.get("status") != "complete":
        return None
    now = semantic(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    differs = difference(now, semantic(rec.get("config") or {}), common_only=True)
    if differs:
        shown = ", ".join(differs[:6]) + (f" (+{len(differs) - 6} more)" if len(differs) > 6 else "")
        raise KpeftError(f"{run_dir} holds a finished record of another config (differs in {shown}); "
                         "re-run it with force=true (the old record is kept aside), or choose a new experiment=NAME")
    return rec


def _hold(run_dir: Path, accelerator: Any) -> RunLock | None:
    """The run directory's lock, held by the main process (the others learn whether it got it)."""
    from accelerate.utils import broadcast_object_list

    lock, error = None, [None]
    if accelerator.is_main_process:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunLocked as err:
            error = [str(err)]
    if accelerator.num_processes > 1:
        error = broadcast_object_list(error)
    if error[0] is not None:
        raise RunLocked(error[0])
    return lock


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configuration end to end and return its record (or the existing one)."""
    run_dir = Path(cfg.run_dir)
    check_unknown_keys(cfg)
    check_method_fits_budget(cfg)
    check_config(cfg)
    if cfg.method.name == "zero_shot" and not cfg.train.eval_only:
        raise KpeftError("method=zero_shot trains nothing: add train.eval_only=true (or pick a method to train)")
    accelerator = make_accelerator(cfg.train)
    lock = _hold(run_dir, accelerator)
    try:
        if accelerator.is_main_process:
            clean_tmp(run_dir)
        rec = existing_record(cfg, run_dir)
        if rec is not None:
            log.info("skip: %s has a finished record of this config (force=true re-runs it)", run_dir)
            return rec
        if accelerator.is_main_process:
            write_overrides(run_dir, cfg.run_overrides)
        accelerator.wait_for_everyone()
        return _train(cfg, run_dir, accelerator)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, accelerator: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    seed_everything(cfg.seed, cfg.train.deterministic)
    datafiles.reset()  # the record lists the data files this run reads (kpeft/datafiles.py)
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
    if cfg.train.eval_only:  # e.g. the zero-shot row of nlg_mini: the untrained model evaluated
        state = LoopState()
    else:
        state = trainer.fit()
        if state.global_step < 1:
            raise KpeftError(f"the run trained 0 optimizer steps ({len(splits['train'])} training examples, "
                             f"train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}); no record written")
    trainer.load_best()
    metrics[cfg.split] = trainer.evaluate(cfg.split, save_examples=True)
    metrics["validation_loss"] = _finite(state.best_val_loss)
    record = complete_record(cfg, run_dir, metrics, counts.as_dict(), trainer.summary(state),
                             train_seconds=state.train_seconds, wall_seconds=time.perf_counter() - t0)
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
    return write_record(run_dir, failed_record(cfg, f"{type(err).__name__}: {err}", tail))


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra app
        return False


def job(cfg: DictConfig) -> float | None:
    """One job (Hydra's task function). In a sweep (``-m``) a failing run writes a failed record and
    the sweep goes on; a single run exits non-zero (a KpeftError in one line). Launchers that run jobs
    in other processes (joblib, submitit) pickle it by reference, ``kpeft.train.job``: importing that
    module in the worker installs kpeft's composition step (kpeft/compose_hook.py) before the worker
    composes its job's config (docs/cluster.md)."""
    sweeping = _in_multirun()
    try:
        record = run(cfg)
    except KpeftError as err:
        print(f"kpeft: error: {err}", file=sys.stderr)
        if not sweeping:
            sys.exit(2)
        if not isinstance(err, RunLocked):  # the directory is another live process's
            write_failure(cfg, err)
        return None
    except Exception as err:  # e.g. out of memory: recorded, and the sweep goes on
        if not sweeping:
            raise
        log.exception("run failed: %s", cfg.run_dir)
        write_failure(cfg, err)
        return None
    return record.get("score")


_hydra_main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(job)


def precheck(argv: list[str]) -> None:
    """Compose a single run once before Hydra does (with the same composition, kpeft/compose_hook.py),
    so that a typo, a wrong type or an out-of-range value is reported in one line naming the key
    (Hydra's own report is longer). Sweeps are checked name by name; ``--help``, ``--hydra-help``,
    ``--info`` and shell completion are left to Hydra."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    check_choices(args.overrides)
    if args.multirun or args.help or args.hydra_help or args.info or args.shell_completion:
        return
    cfg = compose([a for a in args.overrides if not a.startswith(("hydra.", "hydra/", "+hydra", "++hydra"))])
    check_writable_dir(cfg.run_dir, "run directory")  # before Hydra creates it (kpeft/paths.py)


@user_errors
def main() -> None:
    register_configs()
    precheck(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    # `python -m kpeft.train` runs this file as `__main__`; run the importable module's app instead, so
    # that its task function is `kpeft.train.job` in every process (pickled by name, not by value).
    from kpeft.train import main as _main

    _main()
