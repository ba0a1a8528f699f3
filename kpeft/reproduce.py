"""``python -m kpeft.reproduce RUN_DIR [KEY=VALUE ...] [--tolerance A] [--rel-tolerance R] [--out DIR]``

Re-runs a record's exact configuration — its stored resolved config: same seed, same data — into
a temporary folder (or ``--out DIR``; RUN_DIR is never touched), then prints every metric and
parameter count, recorded vs now, and what differs in how the two were made (code, environment,
data). Exit 0 when every number matches within the tolerance (default: exact on CPU with
deterministic kernels), 1 when not. ``KEY=VALUE`` may only change where things are read from
(``task.data_dir=DIR``, ``model.cache_dir=DIR``, ...), never what the run computes. Last stdout line:
one JSON object. docs/reproduce.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kpeft.compare_records import Tolerance, compare_metrics, compare_provenance, default_tolerance, verdict
from kpeft.errors import ArgumentParser, KpeftError, user_errors
from kpeft.paths import REPO_ROOT, check_writable_dir
from kpeft.records import read_record, record_path
from kpeft.runid import inert


def parse(argv: Sequence[str]):
    about = __doc__.split("\n\n")[1].replace("\n", " ")
    parser = ArgumentParser(prog="python -m kpeft.reproduce", description=about)
    parser.add_argument("run_dir", help="a finished run's directory (its record.json)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="KEY=VALUE of where data/weights are read from (e.g. task.data_dir=DIR)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest absolute difference of a metric (default 1e-9 on CPU, deterministic)")
    parser.add_argument("--rel-tolerance", type=float, default=None,
                        help="largest relative difference of a metric (default 0 on CPU, 0.02 on a GPU)")
    parser.add_argument("--out", default=None,
                        help="output_root of the re-run (default: a temporary folder, removed)")
    args = parser.parse_args(list(argv))
    for value, flag in ((args.tolerance, "--tolerance"), (args.rel_tolerance, "--rel-tolerance")):
        if value is not None and not value >= 0:
            raise KpeftError(f"{flag} must be a number >= 0, got {value}")
    return args


def run_directory(path: Path) -> Path:
    """The run directory `path` names: itself, or the folder of a ``record.json`` given instead."""
    if path.is_file() and path.name == record_path(path.parent).name:
        return path.parent
    if path.is_file():
        raise KpeftError(f"'{path}' is a file; pass the run directory that holds a record.json")
    if not path.is_dir():
        raise KpeftError(f"run directory '{path}' does not exist; "
                         "pass the folder that holds a run's record.json")
    return path


def load_record(run_dir: Path) -> dict[str, Any]:
    rec = read_record(run_dir)
    if not isinstance(rec, dict):
        raise KpeftError(f"'{run_dir}' has no readable {record_path(run_dir).name}; "
                         "pass a finished run's directory")
    if rec.get("status") != "complete":
        raise KpeftError(f"the record in '{run_dir}' is not complete (status {rec.get('status')!r}); "
                         "only a finished run can be reproduced")
    if not isinstance(rec.get("config"), dict):
        raise KpeftError(f"the record in '{run_dir}' holds no resolved config; it cannot be re-run")
    return rec


def _relative_run_dir(config: dict[str, Any]) -> Path:
    run_dir, root = Path(str(config.get("run_dir", ""))), Path(str(config.get("output_root", "")))
    try:
        return run_dir.relative_to(root)
    except ValueError:
        return Path(*run_dir.parts[-5:])


def _locate(path: str | None) -> str | None:
    """A relative data path as recorded (from the repository root, e.g. ``tests/fixtures/...``)
    when it is not there from the current folder."""
    if not path or Path(path).expanduser().is_absolute() or Path(path).exists():
        return path
    return str(REPO_ROOT / path) if (REPO_ROOT / path).exists() else path


def rerun_config(rec: dict[str, Any], out: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The record's resolved config, typed as today's code types it (keys added since take their
    defaults), writing under `out`."""
    from kpeft.api import typed_method
    from kpeft.config import Config

    data = dict(rec["config"])
    try:
        method = typed_method(data.pop("method"))
        cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    except (OmegaConfBaseException, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KpeftError(f"the record's config no longer fits this code ({first}); "
                         "the code has changed since this record was made: check out its commit") from None
    cfg.method = method
    cfg.task.data_dir = _locate(cfg.task.data_dir)
    recorded_data = cfg.task.data_dir
    cfg.output_root = str(out)
    cfg.run_dir = str(out / _relative_run_dir(rec["config"]))
    cfg.force, cfg.resume, cfg.train.progress = False, False, False
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KpeftError(f"'{item}' is not KEY=VALUE (e.g. task.data_dir=DIR)")
        if not inert(key):
            raise KpeftError(f"'{key}' changes what the run computes; reproduce re-runs the recorded config "
                             "(only where data and weights are read from may change, e.g. task.data_dir=DIR)")
        try:
            OmegaConf.update(cfg, key, None if value in ("null", "") else value, merge=False)
        except OmegaConfBaseException as err:
            raise KpeftError(f"cannot set '{key}': {str(err).splitlines()[0]}") from None
    data_dir = cfg.task.data_dir
    if data_dir and data_dir == recorded_data and not Path(data_dir).expanduser().exists():
        raise KpeftError(f"the record read its data from '{data_dir}', which is not on this machine; "
                         "pass task.data_dir=DIR, a folder holding the same files")
    return cfg


def _run_with_threads(cfg: DictConfig, rec: dict[str, Any]) -> dict[str, Any]:
    """``kpeft.train.run`` with the recorded number of torch threads (CPU reductions may be summed
    in another order with another count); the count is restored afterwards."""
    import torch

    from kpeft.train import run

    before, n = torch.get_num_threads(), (rec.get("hardware") or {}).get("torch_threads")
    if isinstance(n, int) and n > 0:
        torch.set_num_threads(n)
    try:
        return run(cfg)
    finally:
        torch.set_num_threads(before)


def _fmt(x: float | None) -> str:
    return "—" if x is None else (str(x) if isinstance(x, int) else f"{x:.10g}")


def reproduce(run_dir: Path, out: Path, overrides: Sequence[str],
              atol: float | None, rtol: float | None) -> dict[str, Any]:
    run_dir = run_directory(run_dir)
    rec = load_record(run_dir)
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise KpeftError(f"--out '{out}' is inside the run directory; "
                         "choose a folder outside it (it is never touched)")
    check_writable_dir(out, "reproduction folder")
    cfg = rerun_config(rec, out, overrides)
    now = _run_with_threads(cfg, rec)
    tol = default_tolerance(rec, now)
    tol = Tolerance(tol.absolute if atol is None else atol, tol.relative if rtol is None else rtol)
    rows = compare_metrics(rec, now, tol)
    prov = compare_provenance(rec, now)
    said = verdict(rows, prov)
    width = max((len(r.key) for r in rows), default=6)
    print(f"{run_dir}: re-run in {cfg.run_dir}")
    print(f"tolerance: absolute {tol.absolute:g}, relative {tol.relative:g}")
    print(f"{'':2}{'metric':<{width}}  {'recorded':>16}  {'now':>16}  {'diff':>12}")
    for r in rows:
        diff = "—" if r.diff is None else f"{r.diff:+.3g}"
        mark = "  " if r.ok else "✗ "
        print(f"{mark}{r.key:<{width}}  {_fmt(r.recorded):>16}  {_fmt(r.now):>16}  {diff:>12}")
    for line in prov.lines() or ["code, environment and data: the same"]:
        print(line)
    print(said)
    return {
        "run_dir": str(run_dir), "rerun_dir": str(cfg.run_dir), "reproduced": all(r.ok for r in rows),
        "verdict": said, "tolerance": tol.as_dict(),
        "differs": {r.key: {"recorded": r.recorded, "now": r.now, "diff": r.diff} for r in rows if not r.ok},
        "code_changed": bool(prov.code), "provenance": prov.lines(),
    }


@user_errors
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    temporary = args.out is None
    out = Path(tempfile.mkdtemp(prefix="kpeft-reproduce-")) if temporary else Path(args.out)
    try:
        summary = reproduce(Path(args.run_dir), out, args.overrides, args.tolerance, args.rel_tolerance)
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)
    if temporary:
        summary["rerun_dir"] = None  # removed; --out DIR keeps it
    print(json.dumps(summary))
    if not summary["reproduced"]:
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
