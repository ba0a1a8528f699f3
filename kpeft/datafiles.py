"""The data a run read, for its record (docs/reproduce.md): every data file a task opened (path,
size, SHA-256) and every hub dataset it loaded (name, config, fingerprint). Tasks report their reads
through :func:`note_file` / :func:`note_hub` (kpeft/tasks/benchmark.py); a run starts with
:func:`reset` and its record takes :func:`snapshot`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_files: dict[str, dict[str, Any]] = {}
_hub: dict[str, dict[str, Any]] = {}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reset() -> None:
    """Forget earlier reads (a new run starts)."""
    _files.clear()
    _hub.clear()


def note_file(path: str | Path) -> None:
    """Record that a data file was read (once per path)."""
    path = Path(path)
    key = str(path)
    if key not in _files and path.is_file():
        _files[key] = {"path": key, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def note_known(entry: dict[str, Any]) -> None:
    """Record a data file read by an earlier run whose encoded splits this run reuses
    (kpeft/training/encoded_cache.py): the entry as that run recorded it."""
    _files.setdefault(entry["path"], dict(entry))


def note_hub(path: str, name: str | None, dataset: Any) -> None:
    """Record a hub dataset: its id, config, ``datasets`` version and per-split fingerprints (they
    change with the data files the hub served)."""
    splits = {}
    for split, part in (dataset.items() if hasattr(dataset, "items") else []):
        splits[str(split)] = getattr(part, "_fingerprint", None)
    try:
        from importlib.metadata import version

        lib = version("datasets")
    except Exception:  # not installed: a test's in-memory stand-in
        lib = None
    _hub[f"{path}/{name}"] = {"hub": path, "name": name, "datasets": lib, "fingerprints": splits}


def snapshot() -> dict[str, list[dict[str, Any]]]:
    """The reads since :func:`reset`, sorted by path."""
    return {"files": [_files[k] for k in sorted(_files)], "hub": [_hub[k] for k in sorted(_hub)]}
