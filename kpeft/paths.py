"""Where things are: the repository, the shared data folder, caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``$KPEFT_SHARED_DATA`` or ``../shared/data`` next to the repository."""
    env = os.environ.get("KPEFT_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """``$KPEFT_CACHE`` or ``~/.cache/kpeft`` (rebuilt GGUF models live here)."""
    env = os.environ.get("KPEFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kpeft"


def check_writable_dir(path: str | Path, what: str = "output folder") -> None:
    """`path` can be created (or exists as a folder) and written to, or a one-line KpeftError: a
    folder on the way that is a file, or a read-only one."""
    from kpeft.errors import KpeftError

    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise KpeftError(f"cannot create the {what} '{path}': '{probe}' is a file; choose another output_root")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise KpeftError(f"cannot write the {what} '{path}': '{probe}' is read-only; choose another output_root "
                         "or make it writable")
