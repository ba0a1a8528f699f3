"""Where things are: the repository, the packaged tokenizers, caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZERS = Path(__file__).resolve().parent / "assets" / "tokenizers"
# Backbone family -> the tokenizer files shipped with kpeft (kpeft/assets/tokenizers/SOURCE.md).
PACKAGED_TOKENIZERS = {"gpt2": TOKENIZERS / "gpt2", "t5": TOKENIZERS / "t5"}


def packaged_tokenizer(family: str | None) -> Path | None:
    """The packaged tokenizer folder of a backbone family (GPT-2 BPE, T5 SentencePiece), or None."""
    return PACKAGED_TOKENIZERS.get(str(family))


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
