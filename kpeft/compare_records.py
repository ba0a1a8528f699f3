"""Two records of one configuration side by side (docs/reproduce.md): every metric and parameter
count, recorded vs now, within a tolerance; and what differs in how they were made — the code
(commit, dirty flag, diff), the environment (lock hash, package versions, hardware) and the data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kpeft.runid import flatten, semantic

EXACT = 1e-9  # "exact": equal floats up to this absolute difference (CPU, deterministic kernels)
GPU_REL = 0.02  # default relative tolerance when either run used a GPU or non-deterministic kernels


@dataclass
class Tolerance:
    absolute: float = EXACT
    relative: float = 0.0

    def allows(self, recorded: float, now: float) -> bool:
        return abs(now - recorded) <= max(self.absolute, self.relative * abs(recorded))

    def as_dict(self) -> dict[str, float]:
        return {"absolute": self.absolute, "relative": self.relative}


def default_tolerance(recorded: dict[str, Any], now: dict[str, Any]) -> Tolerance:
    """Exact when both runs ran on CPU with ``train.deterministic``; else :data:`GPU_REL` relative
    (GPU kernels differ between GPU models and library versions even in deterministic mode)."""
    cpu = not (recorded.get("hardware") or {}).get("cuda") and not (now.get("hardware") or {}).get("cuda")
    deterministic = all(((r.get("config") or {}).get("train") or {}).get("deterministic")
                        for r in (recorded, now))
    return Tolerance() if cpu and deterministic else Tolerance(EXACT, GPU_REL)


@dataclass
class MetricRow:
    key: str
    recorded: float | None
    now: float | None
    ok: bool

    @property
    def diff(self) -> float | None:
        if self.recorded is None or self.now is None:
            return None
        return self.now - self.recorded


def numbers(record: dict[str, Any]) -> dict[str, float | None]:
    """``metrics.<split>.<name>`` and ``params.<name>`` of a record (numbers and nulls)."""
    out: dict[str, float | None] = {}
    for section in ("metrics", "params"):
        for key, value in flatten(record.get(section) or {}, section).items():
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                out[key] = value
    return out


def compare_metrics(recorded: dict[str, Any], now: dict[str, Any], tol: Tolerance) -> list[MetricRow]:
    """Every number of either record; parameter counts must be equal, metrics within `tol`."""
    a, b = numbers(recorded), numbers(now)
    rows = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            ok = x is None and y is None and key in a and key in b
        elif key.startswith("params."):
            ok = x == y
        else:
            ok = not (math.isnan(x) or math.isnan(y)) and tol.allows(float(x), float(y))
        rows.append(MetricRow(key, x, y, ok))
    return rows


@dataclass
class Provenance:
    """What differs in how two records were made."""

    code: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    config: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{what}: {line}" for what, items in
                (("code", self.code), ("environment", self.environment), ("data", self.data),
                 ("config", self.config))
                for line in items]


def _code(git: dict[str, Any]) -> str:
    commit = git.get("commit")
    if commit is None:
        return f"unknown ({git.get('reason', 'no commit recorded')})"
    dirty = ""
    if git.get("dirty"):
        diff = git.get("diff_sha256")
        dirty = f"+dirty(diff {diff[:12]})" if diff else "+dirty(diff not recorded)"
    return commit[:12] + dirty


def code_version(record: dict[str, Any]) -> str:
    """A short name of the code a record was made by: ``<commit>[+dirty(diff <hash>)]``."""
    return _code(record.get("git") or {})


def _data_files(record: dict[str, Any]) -> dict[str, str] | None:
    data = record.get("data")
    if not isinstance(data, dict):
        return None
    return {Path(f["path"]).name: f["sha256"] for f in data.get("files") or []}


def compare_provenance(recorded: dict[str, Any], now: dict[str, Any]) -> Provenance:
    out = Provenance()
    ga, gb = recorded.get("git") or {}, now.get("git") or {}
    if ga.get("commit") != gb.get("commit"):
        out.code.append(f"commit {_code(ga)} → {_code(gb)}")
    elif _code(ga) != _code(gb):
        out.code.append(f"working tree {_code(ga)} → {_code(gb)}")
    la, lb = (recorded.get("lock") or {}).get("sha256"), (now.get("lock") or {}).get("sha256")
    if la != lb:
        out.environment.append(f"lock {(la or 'not recorded')[:12]} → {(lb or 'none')[:12]}")
    va, vb = recorded.get("versions") or {}, now.get("versions") or {}
    for name in sorted(set(va) | set(vb)):
        if name in va and va.get(name) != vb.get(name):
            out.environment.append(f"{name} {va.get(name)} → {vb.get(name)}")
    ha, hb = recorded.get("hardware") or {}, now.get("hardware") or {}
    for key in ("cuda", "gpus", "processor", "torch_threads"):
        if ha.get(key) != hb.get(key):
            out.environment.append(f"hardware {key} {ha.get(key)} → {hb.get(key)}")
    wa, wb = ((r.get("training") or {}).get("world_size", 1) for r in (recorded, now))
    if wa != wb:
        out.environment.append(f"processes (world_size) {wa} → {wb} (reproduce re-runs in one process)")
    fa, fb = _data_files(recorded), _data_files(now)
    if fa is None:
        out.data.append("the record lists no data files (made before records carried them)")
    elif fb is not None:
        for name in sorted(set(fa) | set(fb)):
            if fa.get(name) != fb.get(name):
                was, is_ = (fa.get(name) or "not read")[:12], (fb.get(name) or "not read")[:12]
                out.data.append(f"{name} sha256 {was} → {is_}")
    sa, sb = semantic(recorded.get("config") or {}), semantic(now.get("config") or {})
    new = sorted(set(sb) - set(sa))
    if new:
        out.config.append(f"keys the record lacks, run with today's defaults: {', '.join(new[:8])}"
                          + (f" (+{len(new) - 8} more)" if len(new) > 8 else ""))
    changed = sorted(k for k in set(sa) & set(sb) if sa[k] != sb[k])
    if changed:
        out.config.append(f"values differ: {', '.join(changed)}")
    return out


def verdict(rows: list[MetricRow], prov: Provenance) -> str:
    """One sentence: reproduced, or the likeliest reason why not."""
    if all(r.ok for r in rows):
        return "reproduced: every metric and parameter count matches"
    if prov.code:
        return "NOT reproduced: the code has changed since this record was made (" + prov.code[0] + ")"
    if prov.data:
        return "NOT reproduced: the data differ (" + prov.data[0] + ")"
    if prov.environment or prov.config:
        first = (prov.environment + prov.config)[0]
        return "NOT reproduced: the environment or config differs (" + first + ")"
    return "NOT reproduced with the same code, environment and data: the run is not deterministic here"
