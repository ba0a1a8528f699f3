"""``python -m kpeft.params_table [--out FILE] [--paper KM|IT|KA]``: the papers' parameter columns
next to kpeft's own counts (``make params-table``), offline, no weights.

Reads every printed row of ``conf/paper_params.yaml``, counts the same configuration with the
code path of ``python -m kpeft.count`` and marks where our percentage, rounded to the printed
digits, differs (✗). Writes ``results/tables/params.md``; the last stdout line is one JSON object
``{"rows", "match", "differ", "errors", "markdown"}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kpeft.compose import compose
from kpeft.config import CONF_DIR
from kpeft.count import count_parameters
from kpeft.errors import KpeftError, user_errors

DATA = CONF_DIR / "paper_params.yaml"
PAPERS = {"KM": "Kernel-mix (Chen, Hazarika et al. 2022)", "IT": "Inducer-tuning (Chen, Hazarika et al. 2022)",
          "KA": "KronA (Edalati et al.)"}


@dataclass
class PaperRow:
    paper: str
    table: str
    label: str
    model: str
    method: str
    budget: str
    train: str  # as printed
    store: str | None = None
    overrides: list[str] = field(default_factory=list)
    note: str = ""

    def overrides_all(self) -> list[str]:
        return [f"model={self.model}", f"method={self.method}", f"budget={self.budget}", *self.overrides]


@dataclass
class Counted:
    row: PaperRow
    trainable: int | None = None
    stored: int | None = None
    trainable_pct: float | None = None
    stored_pct: float | None = None
    error: str | None = None

    @property
    def matches(self) -> bool | None:
        if self.error:
            return None
        return agrees(self.row.train, self.trainable_pct) and agrees(self.row.store or self.row.train, self.stored_pct)


def load_rows(path: Path = DATA) -> list[PaperRow]:
    return [PaperRow(**r) for r in yaml.safe_load(path.read_text())["rows"]]


def agrees(printed: str, ours: float | None) -> bool:
    """Whether `ours` rounds to the printed number at its digits ("0.07*" → 0.07 at 2 decimals)."""
    number = re.search(r"\d+(?:\.(\d+))?", printed)
    if number is None or ours is None:
        return False
    digits = len(number.group(1) or "")
    return round(ours, digits) == round(float(number.group(0)), digits)


def count_row(row: PaperRow) -> Counted:
    """Our count of `row` (kpeft.count's code path); a config that fails is reported, not raised."""
    try:
        n = count_parameters(compose(row.overrides_all()))
    except KpeftError as err:
        return Counted(row, error=str(err))
    return Counted(row, n.trainable, n.stored, n.trainable_pct, n.stored_pct)


def _ours(count: int | None, pct: float | None) -> str:
    return "—" if count is None else f"{pct:.2f} ({count:,})"


def markdown(counted: Sequence[Counted]) -> str:
    lines = ["# Parameter columns: the papers' printed values and kpeft's counts", "",
             "Percent of the backbone's own parameters (GPT-2 small 124,439,808; RoBERTa-base 124,645,632; "
             "T5-base 222,903,552), counted offline with the code path of `python -m kpeft.count` "
             "(`make params-table` regenerates this file). ✓: ours rounds to the printed value; ✗: it does not.",
             ""]
    header = "| paper | table | row | `model method budget` | printed train | ours train | printed store | ours store | | note |"
    for paper in dict.fromkeys(c.row.paper for c in counted):
        lines += [f"## {PAPERS.get(paper, paper)}", "", header, "|---|---|---|---|---:|---:|---:|---:|---|---|"]
        for c in (c for c in counted if c.row.paper == paper):
            r = c.row
            config = " ".join([r.model, r.method, r.budget, *r.overrides])
            mark = "error" if c.error else ("✓" if c.matches else "✗")
            note = c.error or r.note
            lines.append(f"| {r.paper} | {r.table} | {r.label} | `{config}` | {r.train} | "
                         f"{_ours(c.trainable, c.trainable_pct)} | {r.store or r.train} | "
                         f"{_ours(c.stored, c.stored_pct)} | {mark} | {note} |")
        lines.append("")
    return "\n".join(lines)


def summary(counted: Sequence[Counted]) -> dict:
    return {"rows": len(counted), "match": sum(c.matches is True for c in counted),
            "differ": sum(c.matches is False for c in counted), "errors": sum(c.error is not None for c in counted)}


@user_errors
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m kpeft.params_table", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/tables/params.md")
    parser.add_argument("--paper", action="append", choices=sorted(PAPERS), help="only these papers' rows")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rows = [r for r in load_rows() if not args.paper or r.paper in args.paper]
    counted = [count_row(r) for r in rows]
    text = markdown(counted)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    result = {**summary(counted), "markdown": str(out)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
