"""Whether a table's records were made by one code version and one locked environment; when not,
the footer says so (re-check them with ``python -m kpeft.reproduce``, docs/reproduce.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kpeft.compare_records import code_version


def _listing(counts: Counter) -> str:
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))


def mixed_provenance(records: list[dict[str, Any]]) -> list[str]:
    """Footer lines: the code versions (commit, dirty diff) and lock hashes of `records`, when
    they are not all the same; nothing when they are."""
    code = Counter(code_version(r) for r in records)
    lock = Counter(((r.get("lock") or {}).get("sha256") or "not recorded")[:12] for r in records)
    out = []
    if len(code) > 1:
        out.append(f"records made by {len(code)} code versions: {_listing(code)}")
    if len(lock) > 1:
        out.append(f"records made with {len(lock)} lock versions (requirements/cpu.lock): {_listing(lock)}")
    if out:
        out.append("re-check them with python -m kpeft.reproduce RUN_DIR (docs/reproduce.md)")
    return out
