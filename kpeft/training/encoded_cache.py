"""Encoded splits kept between the runs of a sweep (docs/performance.md).

Every run of a sweep over methods or seeds encodes the same task with the same tokenizer; the first
one writes its encoded splits to ``$KPEFT_CACHE/encoded/<task>-<key>.pkl`` and the others read them.
The key is a SHA-256 of everything the encoding depends on: the resolved task config, the tokenizer
(its full serialisation, added tokens included), the model's position limit, kpeft's task code, and
the listing of ``task.data_dir`` (each file's path, size and modification time). A change to any of
them is a new key; a task read from the hub (no ``task.data_dir``) is not cached (``datasets`` keeps
its own cache). The data files the encoding read are stored with the splits and reported again on a
hit, so the record's ``data`` section is the same either way. ``KPEFT_NO_ENCODED_CACHE=1`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kpeft import datafiles
from kpeft.paths import cache_dir

log = logging.getLogger("kpeft.data")
FORMAT = 1  # bump when the stored layout changes
TASK_CODE = Path(__file__).resolve().parent.parent / "tasks"


@cache
def task_code_hash() -> str:
    """SHA-256 of kpeft's task modules (the encoding code)."""
    h = hashlib.sha256()
    for path in sorted(TASK_CODE.rglob("*.py")):
        h.update(path.relative_to(TASK_CODE).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer: its full serialisation (fast tokenizers) or vocabulary, plus the
    settings that change the ids it returns."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, len(tokenizer), getattr(tokenizer, "padding_side", None),
             getattr(tokenizer, "truncation_side", None), str(getattr(tokenizer, "special_tokens_map", {}))]
    return hashlib.sha256(text.encode() + json.dumps(extra, default=str).encode()).hexdigest()


def data_listing(data_dir: str | Path) -> list[tuple[str, int, int]]:
    root = Path(data_dir)
    if root.is_file():
        return [(root.name, root.stat().st_size, root.stat().st_mtime_ns)]
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def cache_key(task_cfg: DictConfig, tokenizer: Any, max_positions: int | None) -> str | None:
    """The key of a task's encoded splits, or None when they are not cached (hub data, no tokenizer)."""
    data_dir = task_cfg.get("data_dir")
    root = Path(data_dir).expanduser() if data_dir else None
    if root is None or tokenizer is None or not root.exists():
        return None
    parts = {
        "format": FORMAT,
        "task": OmegaConf.to_container(task_cfg, resolve=True),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_positions": max_positions,
        "code": task_code_hash(),
        "data": data_listing(root),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def encoded_splits(task: Any, task_cfg: DictConfig) -> dict[str, list]:
    """``task.load_splits()``, read from the cache when an earlier run encoded the same thing."""
    key = None if os.environ.get("KPEFT_NO_ENCODED_CACHE") else cache_key(task_cfg, task.tokenizer, task.max_positions)
    if key is None:
        return task.load_splits()
    path = cache_dir() / "encoded" / f"{task.name}-{key}.pkl"
    if path.is_file():
        try:
            with open(path, "rb") as f:
                stored = pickle.load(f)
            for entry in stored["files"]:
                datafiles.note_known(entry)
            log.info("encoded splits of %s read from the cache %s", task.name, path)
            return stored["splits"]
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
            log.warning("ignoring the unreadable encoded-splits cache %s (%s); encoding again", path, err)
    splits = task.load_splits()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"splits": splits, "files": datafiles.snapshot()["files"]}, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)  # atomic: a concurrent run reads the old file or the new one, never half of one
    except OSError as err:
        log.warning("could not write the encoded-splits cache %s (%s)", path, err)
    return splits
