"""``python -m kpeft.tables experiment=<name> | RUNS_DIR_OR_GLOB … [--rows method,budget] [--cols task]
[--baseline lora] [--metric accuracy] [k=v …] [--out DIR] [--no-figure] [--bootstrap N]``

Builds a table purely from run records: Markdown and LaTeX (booktabs) in the paper's layout —
methods grouped by budget, trained and stored parameter percentages, mean ± standard deviation over
seeds, the best value per group in bold, significance marks against the best baseline of each
group — and a figure (each row's score, mean ± std). A paper preset (``experiment=km_table1``)
gives its declared table (missing runs show as ``—`` with a count); any other experiment
(``experiment=mine``) or folder/glob of runs gives a table of exactly the records found, rows by
``--rows``, columns by ``--cols``; ``--baseline`` names the rows the others are tested against.
Writes ``<DIR>/<name>.{md,tex,png}`` (DIR = ``results/tables``), prints the Markdown, and as its
last stdout line one JSON object: ``{"experiment","markdown","latex","figure","runs","complete",
"missing","failed"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kpeft.errors import ArgumentParser, KpeftError, user_errors
from kpeft.experiments.build import TableView, build, only_found
from kpeft.experiments.collect import collect, load_runs
from kpeft.experiments.figure import plot
from kpeft.experiments.found import find_records, found_table
from kpeft.experiments.preset import compose_preset, declared_spec, runs_root
from kpeft.experiments.render import latex, markdown


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(options, config overrides ``k=v``, run folders / globs)."""
    parser = ArgumentParser(prog="python -m kpeft.tables", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/tables", help="folder for <name>.md/.tex/.png")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples")
    parser.add_argument("--rows", help="record fields of a row, e.g. method,budget (the default; first = label)")
    parser.add_argument("--cols", help="record fields of a column, e.g. task (the default) or model")
    parser.add_argument("--baseline", help="rows (their label, e.g. lora) the others are tested against")
    parser.add_argument("--metric", help="metric columns, e.g. accuracy or bleu_all,ter_all (default: the task's)")
    parser.add_argument("--name", help="file name of a table of folders/globs (default: table)")
    args, rest = parser.parse_known_args(list(argv))
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, [a for a in rest if "=" in a], [a for a in rest if "=" not in a]


def _write(view: TableView, name: str, out: Path, figure: bool, n_boot: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    md, tex = markdown(view, n_boot), latex(view, n_boot)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".tex").write_text(tex)
    png = plot(view, stem.with_suffix(".png")) if figure else None
    print(md)
    return {"experiment": name, "markdown": str(stem.with_suffix(".md")),
            "latex": str(stem.with_suffix(".tex")), "figure": str(png) if png else None,
            "runs": view.expected, "complete": view.expected - len(view.missing),
            "missing": len(view.missing), "failed": len(view.failed)}


def table_of_records(records: list[dict], name: str, out: Path, args: argparse.Namespace, title: str) -> dict:
    rows = _names(args.rows) or ["method", "budget"]
    if not args.rows and len({r.get("model") for r in records}) > 1:
        rows.append("model")  # several backbones: one row per backbone too
    spec, runs, used = found_table(records, rows, _names(args.cols) or ["task"], _names(args.baseline),
                                   _names(args.metric), title)
    if args.baseline and not any(r.baseline for g in spec.groups for r in g.rows):
        labels = sorted({r.method for g in spec.groups for r in g.rows})
        raise KpeftError(f"--baseline {args.baseline} names no row; rows: {', '.join(labels)}")
    models = ", ".join(sorted({str(r.get("model")) for r in records}))
    view = only_found(build(spec, models, runs, args.bootstrap), runs, used)
    return _write(view, name, out, not args.no_figure, args.bootstrap)


def make_table(overrides: Sequence[str], out: Path, figure: bool = True, n_boot: int = 1000,
               args: argparse.Namespace | None = None) -> dict:
    """Build, write and return the summary of the table of the experiment `overrides` name."""
    args = args or parse([])[0]
    args.no_figure, args.bootstrap = not figure, n_boot
    cfg = compose_preset(overrides)
    spec = declared_spec(cfg)
    if spec is not None and spec.kind == "bench":
        from kpeft.experiments.bench_table import bench_table

        return bench_table(cfg, spec, out)
    if spec is None:  # an experiment without a declared table: exactly the records it has
        records = find_records([str(runs_root(cfg))])
        if any(o.split("=", 1)[0].lstrip("+") == "model" for o in overrides):
            records = [r for r in records if r.get("model") == cfg.model.name]
        if not records:
            raise KpeftError(f"experiment '{cfg.experiment}' has no records in {runs_root(cfg)}; run it first "
                             f"(python -m kpeft.train -m experiment={cfg.experiment} …)")
        return table_of_records(records, cfg.experiment, out, args, f"experiment {cfg.experiment}")
    if args.rows or args.cols or args.metric:
        raise KpeftError(f"experiment '{cfg.experiment}' declares its table; --rows/--cols/--metric are for "
                         f"tables of found records (python -m kpeft.tables {runs_root(cfg)} --rows …)")
    if args.baseline:
        names = set(_names(args.baseline))
        for group in spec.groups:
            for row in group.rows:
                row.baseline = row.method in names or row.label in names
        if not any(r.baseline for g in spec.groups for r in g.rows):
            labels = sorted({r.method for g in spec.groups for r in g.rows})
            raise KpeftError(f"--baseline {args.baseline} names no row of experiment '{cfg.experiment}'; "
                             f"rows: {', '.join(labels)}")
    view = build(spec, cfg.model.name, collect(spec, cfg.model.name, load_runs(runs_root(cfg))), n_boot)
    return _write(view, cfg.experiment, out, figure, n_boot)


@user_errors
def main(argv: Sequence[str] | None = None) -> dict:
    args, overrides, sources = parse(sys.argv[1:] if argv is None else argv)
    if sources and any(o.split("=", 1)[0].lstrip("+") == "experiment" for o in overrides):
        raise KpeftError("give either experiment=NAME or run folders/globs, not both")
    if sources:
        records = find_records(sources)
        if not records:
            raise KpeftError(f"no run records under {', '.join(sources)}; pass run directories or a glob of them")
        name = args.name or "table"
        summary = table_of_records(records, name, Path(args.out), args, f"runs of {', '.join(sources)}")
    else:
        summary = make_table(overrides, Path(args.out), not args.no_figure, args.bootstrap, args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
