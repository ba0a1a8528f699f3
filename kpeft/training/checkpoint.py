"""Adapter-only checkpoints: safetensors of the trained tensors + the resolved config.

* ``checkpoints/best/`` — the adapter with the best validation loss (what evaluation uses).
* ``checkpoints/last/`` — everything needed to resume a killed run exactly: trained tensors,
  optimizer and scheduler state, loop position, and every process's RNG states.

Directories are replaced atomically (write ``*.tmp``, then rename), so a kill at any moment leaves
a complete checkpoint behind. A 0.1% adapter is saved as 0.1%, never as a full model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from kpeft.errors import KpeftError
from kpeft.methods import AdaptedModel
from kpeft.records import output_mode

ADAPTER_FILE = "adapter.safetensors"
# Keys that may change between a run and its resumption without changing its results.
VOLATILE_KEYS = ("resume", "force", "logger", "train.crash_after_steps", "train.progress",
                 "train.checkpoint_every_steps", "train.num_workers", "train.eval_batch_size")


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys that do not affect results."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for key in VOLATILE_KEYS:
        node, *rest = key.split(".")
        if rest:
            data.get(node, {}).pop(rest[0], None)
        else:
            data.pop(node, None)
    return data


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _replace_dir(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(directory: Path, adapted: AdaptedModel, cfg: DictConfig) -> None:
    """Write ``adapter.safetensors`` + ``config.yaml`` into `directory`, atomically."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(adapted.adapter_state_dict(), str(tmp / ADAPTER_FILE))
    output_mode(tmp / ADAPTER_FILE)
    OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
    _replace_dir(tmp, directory)


RESTART = "re-run with resume=false (start over) or force=true (replace the run)"


def _unreadable(path: Path, err: BaseException, fix: str = RESTART) -> KpeftError:
    """A one-line error for a checkpoint file that does not load (truncated, not ours, missing)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return KpeftError(f"checkpoint file '{path}' does not load ({type(err).__name__}: {first}); "
                      f"it is damaged or from another method/model: {fix}")


def _load(path: Path, loader, fix: str = RESTART):
    try:
        return loader(path)
    except KpeftError:
        raise
    except Exception as err:  # truncated file, wrong format, tensors of another shape, ...
        raise _unreadable(path, err, fix) from None


def read_adapter_file(path: Path, fix: str = RESTART) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter.safetensors``, or a one-line error naming the file and `fix`."""
    return _load(path, lambda p: load_file(str(p)), fix)


def read_config_file(path: Path, fix: str = RESTART) -> DictConfig:
    """A checkpoint's ``config.yaml``, or a one-line error naming the file and `fix`."""
    cfg = _load(path, OmegaConf.load, fix)
    if not isinstance(cfg, DictConfig):
        raise _unreadable(path, ValueError("not a mapping"), fix)
    return cfg


def load_adapter(directory: Path, adapted: AdaptedModel) -> None:
    path = directory / ADAPTER_FILE
    _load(path, lambda p: adapted.load_adapter_state_dict(load_file(str(p))))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    directory: Path, adapted: AdaptedModel, optimizer, scheduler, loop_state: dict, cfg: DictConfig, accelerator
) -> None:
    """The resumable checkpoint. Every rank writes its RNG state; the main process the rest."""
    tmp = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(adapted.adapter_state_dict(), str(tmp / ADAPTER_FILE))
        output_mode(tmp / ADAPTER_FILE)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"loop": loop_state, "config": fingerprint(cfg)}, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, directory)
    accelerator.wait_for_everyone()


def find_resumable(directory: Path) -> Path | None:
    """``last/``, or ``last.old/`` if a kill interrupted the rename."""
    for cand in (directory, directory.with_name(directory.name + ".old")):
        if (cand / "state.json").exists():
            return cand
    return None


def load_training_state(directory: Path, adapted: AdaptedModel, optimizer, scheduler, cfg: DictConfig, accelerator) -> dict:
    """Restore a checkpoint written by :func:`save_training_state`; returns the loop state."""
    saved = _load(directory / "state.json", lambda p: json.loads(p.read_text()))
    if not isinstance(saved, dict) or not {"config", "loop"} <= saved.keys():
        raise _unreadable(directory / "state.json", ValueError("no 'config' and 'loop' entries"))
    changed = _diff(saved["config"], fingerprint(cfg))
    if changed:
        raise KpeftError(
            f"cannot resume from {directory}: it was written by another config (differs in "
            f"{', '.join(changed[:6])}); use the original settings, another run_dir, or force=true to start over"
        )
    load_adapter(directory, adapted)
    def restore(path: Path) -> None:
        opt = torch.load(path, weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])

    _load(directory / "optimizer.pt", restore)
    rng_file = directory / f"rng_rank{accelerator.process_index}.pt"
    if not rng_file.exists():
        raise KpeftError(f"cannot resume from {directory}: no RNG state for process {accelerator.process_index} "
                         "(was it written with a different number of processes?)")
    _load(rng_file, lambda p: set_rng_state(torch.load(p, weights_only=False)))
    return saved["loop"]
