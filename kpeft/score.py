"""``python -m kpeft.score task=T predictions=FILE [task.data_dir=DIR] [split=test] [k=v …]``

Scores a predictions file with the task's official metrics and prints, as its last stdout line,
one JSON object:

* ``webnlg`` — ``{"bleu": {"seen", "unseen", "all"}, "meteor": {…}, "ter": {…}}`` (BLEU ×100,
  METEOR and TER fractions; one output line per test entry, in the official XML order);
* ``e2e`` — ``{"bleu", "nist", "meteor", "rouge_l", "cider"}`` (the challenge's e2e-metrics; one
  output line per unique test MR, in first-appearance order);
* ``coqa`` — ``{"em", "f1", "turns", "missing", "in_domain": {…}, "out_domain": {…}, "domains": {…}}``
  (the official JSON list ``[{"id", "turn_id", "answer"}]``);
* ``cnndm`` — ``{"rouge1", "rouge2", "rougeL", "rougeLsum", "rouge2_vglm"}`` (one summary per line);
* ``glue_<t>`` — the task's metrics, e.g. ``{"mcc"}``, ``{"f1", "accuracy"}``, ``{"mnli_m",
  "mnli_mm"}`` (one label or score per line).

Before it, one ``name: value`` line per metric, rounded as the official scorers print them (2
decimals; CoQA's 1); the JSON keeps the full precision. The other arguments are Hydra overrides of the run config (``task.options.meteor=off``, …).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from kpeft.compose import compose
from kpeft.errors import KpeftError, user_errors
from kpeft.tasks import task_class
from kpeft.tasks.benchmark import BenchmarkTask, canonical_split

USAGE = "usage: python -m kpeft.score task=T predictions=FILE [task.data_dir=DIR] [split=test]"


def split_args(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(predictions path, the remaining Hydra overrides)."""
    predictions, rest = None, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "predictions":
            predictions = value
        else:
            rest.append(arg)
    if not predictions:
        raise KpeftError(f"no predictions file; {USAGE}")
    if not any(a.partition("=")[0] == "task" for a in rest):
        raise KpeftError(f"no task; {USAGE}")
    return predictions, rest


def score(argv: Sequence[str]) -> dict[str, Any]:
    predictions, overrides = split_args(argv)
    cfg = compose(overrides)
    cls = task_class(cfg.task)
    if not issubclass(cls, BenchmarkTask):
        raise KpeftError(f"task '{cfg.task.name}' has no official scorer; tasks that do: webnlg, e2e, coqa, cnndm, glue_*")
    task = cls(cfg.task)
    return task.score(task.read_predictions(predictions), canonical_split(cfg.split))


def display(result: dict[str, Any], digits: int = 2, prefix: str = "") -> list[str]:
    """``name: value`` lines, floats rounded to `digits` (display only; the JSON is not rounded)."""
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines += display(value, digits, f"{prefix}{key}.")
        elif isinstance(value, float):
            lines.append(f"{prefix}{key}: {value:.{digits}f}")
        else:
            lines.append(f"{prefix}{key}: {value}")
    return lines


@user_errors
def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    result = score(args)
    digits = 1 if "task=coqa" in args else 2
    print("\n".join(display(result, digits)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
