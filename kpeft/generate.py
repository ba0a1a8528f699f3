"""``python -m kpeft.generate RUN_DIR [--input FILE|-] [--split test] [--out FILE] [--json]
[--batch-size N] [--num-beams N]``: a finished run generates, with its own task encoding.

* ``--input``: one input per line in the task's raw input format (``docs/generate_export.md``):

  - ``webnlg`` — a linearised triple set ``subject | property | object ; subject | property | object``
    (or a JSON list of ``[subject, property, object]`` triples);
  - ``e2e`` — an E2E meaning representation ``name[The Eagle], eatType[coffee shop]``;
  - ``cnndm`` — the article text;
  - ``coqa`` — ``story<TAB>question`` or ``story<TAB>q1<TAB>a1<TAB>…<TAB>question``;

  a line that starts with ``{`` is read as the task's JSON record itself (e.g. ``{"triples": …}``).
* ``--split test``: regenerates the run's evaluation outputs (the same items, capped as in the
  run, at the run's generation batch size): the text of ``<run_dir>/generations/<split>.jsonl``.

One output per input line (text; ``--json``: JSON lines with the input and the prediction).
Batched greedy decoding with the KV cache (:mod:`kpeft.training.decode`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kpeft.errors import KpeftError, user_errors


def _webnlg(line: str) -> dict[str, Any]:
    if line.startswith("["):
        return {"triples": json.loads(line)}
    triples = [[part.strip() for part in t.split(" | ")] for t in line.split(" ; ") if t.strip()]
    bad = [t for t in triples if len(t) != 3]
    if not triples or bad:
        raise ValueError("expected 'subject | property | object' triples separated by ' ; '")
    return {"triples": triples}


def _e2e(line: str) -> dict[str, Any]:
    from kpeft.tasks.e2e import parse_mr

    return {"mr": line, "slots": parse_mr(line)}


def _cnndm(line: str) -> dict[str, Any]:
    return {"article": line, "highlights": line}  # the prompt ignores the highlights (target None)


def _coqa(line: str) -> dict[str, Any]:
    story, *history = line.split("\t")
    if not history or len(history) % 2 == 0:
        raise ValueError("expected story<TAB>question (or story<TAB>q1<TAB>a1<TAB>...<TAB>question)")
    return {"story": story, "history": history, "question": history[-1]}


PARSERS: dict[str, Callable[[str], dict[str, Any]]] = {"webnlg": _webnlg, "e2e": _e2e, "cnndm": _cnndm, "coqa": _coqa}


def parse_inputs(task_name: str, lines: list[str]) -> list[dict[str, Any]]:
    """Records of the task for raw input lines; a wrong line is a one-line error naming it."""
    parser = PARSERS[task_name]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.startswith("{") else parser(line)
        except (ValueError, KpeftError) as err:
            raise KpeftError(f"input line {n} is not a {task_name} input: {str(err).splitlines()[0]}") from None
        records.append(record)
    return records


def generate(run, records: list[dict[str, Any]], batch_size: int | None = None, num_beams: int | None = None) -> list[str]:
    """The run's generations for task records (as :meth:`NLGTask.generate`)."""
    task = run.task
    if batch_size is None:
        batch_size = int(task.options.get("generation_batch_size") or run.config.train.eval_batch_size)
    if num_beams is not None and num_beams != task.decoding.num_beams:  # --num-beams over the run's own decode settings
        task.decoding = dataclasses.replace(task.decoding, num_beams=num_beams)
    for n, record in enumerate(records, 1):
        try:
            prompt = task.prompt(record)
        except (KeyError, TypeError) as err:
            raise KpeftError(f"input {n} lacks field {err} of a {task.name} record") from None
        if prompt is None:
            raise KpeftError(f"input {n} is too short for task {task.name} (the run's encoding drops it)")
    return task.generate(run.model.model, records, batch_size)


def _read_lines(source: str) -> list[str]:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return [line.rstrip("\r") for line in text.splitlines() if line.strip()]


def run_generate(args: argparse.Namespace) -> list[str]:
    from kpeft.api import load_run

    if (args.input is None) == (args.split is None):
        raise KpeftError("give exactly one of --input FILE|- (new inputs) or --split NAME (the run's own data)")
    if args.num_beams is not None and args.num_beams < 1:
        raise KpeftError(f"--num-beams must be >= 1, not {args.num_beams}")
    if args.input not in (None, "-") and not Path(args.input).is_file():
        raise KpeftError(f"--input '{args.input}' does not exist")
    run = load_run(args.run_dir)
    task = run.task
    if task.name not in PARSERS or not task.generates:
        raise KpeftError(f"task '{task.name}' is not a generation task; kpeft.generate serves "
                         f"{', '.join(sorted(PARSERS))} (evaluate other runs with their record)")
    if torch.cuda.is_available():
        run.model.model.to("cuda")
    if args.split is not None:
        records = task._cap(task.generation_records(args.split), args.split)
        shown = [r.get("id", str(i)) for i, r in enumerate(records)]
    else:
        lines = _read_lines(args.input)
        records, shown = parse_inputs(task.name, lines), lines
    predictions = generate(run, records, args.batch_size, args.num_beams)
    key = "id" if args.split is not None else "input"
    if args.json:
        return [json.dumps({key: s, "prediction": p}, ensure_ascii=False) for s, p in zip(shown, predictions)]
    return [" ".join(p.splitlines()) for p in predictions]


@user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kpeft.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run's directory (python -m kpeft.train)")
    parser.add_argument("--input", help="a file of inputs, one per line ('-': standard input)")
    parser.add_argument("--split", help="regenerate the run's evaluation outputs of this split (test, validation)")
    parser.add_argument("--out", help="write here instead of standard output")
    parser.add_argument("--json", action="store_true", help="JSON lines: the input (or item id) and the prediction")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts decoded together (default: the run's)")
    parser.add_argument("--num-beams", type=int, default=None, help="beam width (1 = greedy; default: the run's decode.num_beams)")
    args = parser.parse_args(argv)
    lines = run_generate(args)
    text = "".join(line + "\n" for line in lines)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
