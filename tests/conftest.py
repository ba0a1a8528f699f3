"""Shared test set-up: offline, quiet, and small."""

from __future__ import annotations

import os

import pytest

# Tests never need the network; fail fast instead of waiting on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real Hydra config with `overrides`, writing runs under a temporary root."""
    from kpeft.compose import compose

    def _make(*overrides: str, root=None):
        base = [f"output_root={root or tmp_path / 'runs'}", "train.progress=false"]
        return compose([*base, *overrides])

    return _make
