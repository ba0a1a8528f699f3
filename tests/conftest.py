"""Shared test set-up: offline, quiet, and small."""

from __future__ import annotations

import os

import pytest

# Tests never need the network; fail fast instead of waiting on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KPEFT_NO_ENCODED_CACHE", "1")  # tests encode afresh; tests/test_encoded_cache.py turns it on


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real Hydra config with `overrides`, writing runs under a temporary root."""
    from kpeft.compose import compose

    def _make(*overrides: str, root=None):
        base = [f"output_root={root or tmp_path / 'runs'}", "train.progress=false"]
        return compose([*base, *overrides])

    return _make


class NonStandardJSON(Exception):
    pass


def _strict(constant: str):
    raise NonStandardJSON(f"non-standard JSON constant {constant}")


def check_strict_records(root) -> None:
    """Every run record and evaluation record under `root` is strict JSON (no NaN / Infinity).
    Files that are no JSON at all are the damaged records some tests write on purpose."""
    import json
    from pathlib import Path

    root = Path(root)
    paths = [*root.rglob("record*.json"), *root.rglob("evaluations/*.json")]
    for path in paths:
        try:
            json.loads(path.read_text(errors="replace"), parse_constant=_strict)
        except NonStandardJSON as err:
            raise AssertionError(f"{path} is not strict JSON: {err}") from None
        except ValueError:
            continue


@pytest.fixture(autouse=True)
def _records_are_strict_json(request):
    """After each test that has a tmp_path: the records it wrote there parse as strict JSON."""
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None:
        check_strict_records(root)


@pytest.fixture(autouse=True, scope="session")
def _session_records_are_strict_json(tmp_path_factory):
    """At the end of the session: every record under pytest's temporary folders (module fixtures too)."""
    yield
    check_strict_records(tmp_path_factory.getbasetemp())
