"""``python -m kpeft.tables experiment=<preset> [k=v …] [--out DIR] [--no-figure] [--bootstrap N]``

Builds a paper table purely from the run records of a preset (``results/runs/<experiment>/``):
Markdown and LaTeX (booktabs) in the paper's layout — methods grouped by budget, trained and
stored parameter percentages, mean ± standard deviation over seeds, the best value per group in
bold, significance marks against the best baseline of each group — and a figure (score against
trained-parameter percentage). Missing runs show as ``—`` with a count. Writes
``<DIR>/<experiment>.{md,tex,png}`` (DIR = ``results/tables``), prints the Markdown, and as its
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
from kpeft.experiments.build import build
from kpeft.experiments.collect import collect, load_runs
from kpeft.experiments.figure import plot
from kpeft.experiments.preset import compose_preset, runs_root, table_spec
from kpeft.experiments.render import latex, markdown


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgumentParser(prog="python -m kpeft.tables", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/tables", help="folder for <experiment>.md/.tex/.png")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples")
    return parser.parse_known_args(list(argv))


def make_table(overrides: Sequence[str], out: Path, figure: bool = True, n_boot: int = 1000) -> dict:
    """Build, write and return the summary of the table of the preset `overrides` name."""
    cfg = compose_preset(overrides)
    spec = table_spec(cfg)
    if spec.kind == "bench":
        from kpeft.experiments.bench_table import bench_table

        return bench_table(cfg, spec, out)
    if not spec.groups or not spec.tasks:
        raise KpeftError(f"experiment '{cfg.experiment}' declares no table (hydra.sweeper.table) and "
                         f"{runs_root(cfg)} holds no records; run its sweep first")
    view = build(spec, cfg.model.name, collect(spec, cfg.model.name, load_runs(runs_root(cfg))), n_boot)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / cfg.experiment
    md, tex = markdown(view, n_boot), latex(view, n_boot)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".tex").write_text(tex)
    png = plot(view, stem.with_suffix(".png")) if figure else None
    print(md)
    return {"experiment": cfg.experiment, "markdown": str(stem.with_suffix(".md")),
            "latex": str(stem.with_suffix(".tex")), "figure": str(png) if png else None,
            "runs": view.expected, "complete": view.expected - len(view.missing),
            "missing": len(view.missing), "failed": len(view.failed)}


@user_errors
def main(argv: Sequence[str] | None = None) -> dict:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    summary = make_table(overrides, Path(args.out), not args.no_figure, args.bootstrap)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
