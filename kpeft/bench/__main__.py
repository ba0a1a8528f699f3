"""``python -m kpeft.bench [--quick] [--methods lora,krona] [--batch B] [--seq-len T] …``

Prints the Markdown table, then, as the last stdout line, the result as one JSON object; writes
``<out>/<host-kind>.json`` and ``.md`` (``results/bench/``; ``--quick`` runs write
``<host-kind>.quick.*``). See the README's "Performance" section.

``python -m kpeft.bench --runs [--quick] [--jobs ...] [--scales 1,2,4] [--rounds 2]``: whole runs of
``python -m kpeft.train`` against a ``transformers.Trainer`` + PEFT script, by phase
(:mod:`kpeft.bench.runs`; ``results/bench/runs-<host-kind>.json`` and ``.md``; docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kpeft.bench.report import markdown
from kpeft.bench.run import QUICK, Options, run
from kpeft.compose import available
from kpeft.errors import ArgumentParser, KpeftError, user_errors
from kpeft.paths import REPO_ROOT


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse(argv: Sequence[str]) -> tuple[Options, argparse.Namespace]:
    defaults = Options()
    p = ArgumentParser(prog="python -m kpeft.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"a seconds-long run on a tiny model ({QUICK})")
    p.add_argument("--model", help=f"a causal LM in conf/model (default {defaults.model})")
    p.add_argument("--methods", type=_csv, help="comma-separated method names (default: every conf/method)")
    p.add_argument("--budgets", type=_csv, help=f"budget preference order (default {','.join(defaults.budgets)})")
    for name in ("batch", "seq_len", "repeats", "warmup", "latency_batch", "latency_seq_len", "latency_repeats",
                 "decode_batch", "decode_prompts", "decode_prompt_len", "decode_new_tokens", "decode_repeats",
                 "krona_repeats", "peft_rank", "threads", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, help=f"default {getattr(defaults, name)}")
    p.add_argument("--target-frac", type=float, help=f"scored part of a training row (default {defaults.target_frac})")
    p.add_argument("--slow-factor", type=float,
                   help=f"time once the models whose warm-up step is this many times PEFT's (default {defaults.slow_factor:g})")
    p.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"),
                   help="CPU timer: process CPU time (default with one thread) or wall time")
    p.add_argument("--runs", action="store_true",
                   help="whole runs: python -m kpeft.train vs a transformers.Trainer + PEFT script (docs/performance.md)")
    p.add_argument("--rounds", type=int, help="--runs: interleaved rounds (default 2; --quick 1)")
    p.add_argument("--scales", type=_csv, help="--runs: training-data multiples (default 1,2,4; --quick 1)")
    p.add_argument("--note", help="--runs: a remark kept in the record (e.g. how loaded the machine was)")
    p.add_argument("--jobs", type=_csv, help="--runs: sst2_minilm,webnlg_tiny (default both)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench", help="where the .json/.md go")
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(list(argv))
    values = dict(QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Options)
                   if getattr(args, f.name, None) is not None})
    check(values)
    return Options(**values), args


def check(values: dict) -> None:
    """Names that exist and counts that are positive, each wrong one refused in one line."""
    for group, names in (("model", [values.get("model")]), ("method", values.get("methods") or ()),
                         ("budget", values.get("budgets") or ())):
        for name in names:
            if name is not None and name not in available(group):
                raise KpeftError(f"unknown {group} '{name}'; valid: {', '.join(available(group))}")
    for name, value in values.items():
        lowest = 0 if name in ("threads", "seed") else 1
        if isinstance(value, int) and not isinstance(value, bool) and value < lowest:
            raise KpeftError(f"--{name.replace('_', '-')} must be ≥ {lowest}, not {value}")
    frac = values.get("target_frac")
    if frac is not None and not 0 < frac <= 1:
        raise KpeftError(f"--target-frac must be in (0, 1], not {frac}")


def with_provenance(result: dict) -> dict:
    """The code and environment that measured `result` (as a run record has them, docs/reproduce.md):
    git commit and dirty flag, the lock file's hash, package versions, hardware, time."""
    from kpeft.records import provenance

    prov = provenance()
    prov.pop("data", None)  # a bench reads no data files of its own
    result["provenance"] = prov
    return result


def save(result: dict, out: Path, quick: bool) -> Path:
    """``<out>/<host-kind>[.quick].json`` and ``.md``; returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = result["setup"]["host_kind"] + (".quick" if quick else "")
    path = out / f"{stem}.json"
    result["setup"]["saved_to"] = str(path)
    (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return path


def run_options(args: argparse.Namespace):
    """The ``--runs`` options, each wrong one refused in one line."""
    from kpeft.bench import jobs as bench_jobs
    from kpeft.bench.runs import RunOptions

    names = args.jobs or bench_jobs.JOBS
    for name in names:
        if name not in bench_jobs.JOBS:
            raise KpeftError(f"unknown --jobs entry '{name}'; valid: {', '.join(bench_jobs.JOBS)}")
    try:
        scales = tuple(int(s) for s in (args.scales or (("1",) if args.quick else ("1", "2", "4"))))
    except ValueError:
        raise KpeftError(f"--scales takes positive integers, e.g. 1,2,4, not {','.join(args.scales)}") from None
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    if rounds < 1 or min(scales) < 1:
        raise KpeftError("--rounds and every --scales entry must be ≥ 1")
    return RunOptions(jobs=tuple(names), scales=scales, rounds=rounds, threads=args.threads or 1, quick=args.quick)


def save_runs(result: dict, out: Path, quick: bool) -> Path:
    """``<out>/runs-<host-kind>[.quick].json`` and ``.md``; returns the JSON path."""
    from kpeft.bench.runs import markdown as runs_markdown

    out.mkdir(parents=True, exist_ok=True)
    stem = "runs-" + result["setup"]["host_kind"] + (".quick" if quick else "")
    path = out / f"{stem}.json"
    result["setup"]["saved_to"] = str(path)
    (out / f"{stem}.md").write_text(runs_markdown(result) + "\n", encoding="utf-8")
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return path


def main_runs(args: argparse.Namespace) -> dict:
    from kpeft.bench.runs import markdown as runs_markdown
    from kpeft.bench.runs import run_all

    result = with_provenance(run_all(run_options(args)))
    if args.note:
        result["setup"]["note"] = args.note
    if not args.no_save:
        save_runs(result, args.out, args.quick)
    print(runs_markdown(result))
    print(json.dumps(result))
    return result


@user_errors
def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    opts, args = parse(sys.argv[1:] if argv is None else argv)
    if args.runs:
        return main_runs(args)
    result = with_provenance(run(opts))
    if not args.no_save:
        save(result, args.out, args.quick)
    print(markdown(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
