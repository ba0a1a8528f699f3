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
