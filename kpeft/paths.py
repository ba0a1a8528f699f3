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
