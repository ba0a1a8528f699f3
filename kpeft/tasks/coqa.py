"""CoQA (docs/benchmarks.md; [KM] App. B.2): conversational question answering over a story.

Under ``task.data_dir``: the official JSON files (names in ``task.options.train_file`` /
``dev_file``, by default ``coqa-train-v1.0.json`` and ``coqa-dev-v1.0.json``; layout
``{"version", "data": [{"id", "source", "story", "questions": [{"turn_id", "input_text"}],
"answers": [{"turn_id", "input_text", "span_text", ...}], "additional_answers": {"0": [...], ...}}]}``).
Without it the hub's ``coqa`` is read and adapted (it has no story ids and no
``additional_answers``, so only the official dev file gives the official numbers).

Splits ([KM] fn 9, [IT] fn 6): ``test`` = the official dev file; ``validation`` =
``task.options.n_validation`` (500) training *dialogues* drawn with ``task.options.split_seed``;
``train`` = the other training dialogues, in file order.

A record is one turn: ``{"id", "turn_id", "source", "story", "question", "history", "answer",
"golds"}`` where ``history`` = the last ``2·max_history+1`` utterances (alternating questions and
gold answers, ending with this turn's question; ``task.options.max_history``, 2 in the official
code) and ``golds`` = every annotator's answer (``answers`` then ``additional_answers``).

``python -m kpeft.score task=coqa predictions=FILE``: the official JSON list
``[{"id", "turn_id", "answer"}, ...]``; EM / F1 overall, in-domain, out-of-domain, per domain.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kpeft.errors import KpeftError
from kpeft.metrics import coqa as metric
from kpeft.tasks.benchmark import Record, canonical_split, read_text
from kpeft.tasks.nlg import NLGTask, Segment, flat_metrics


def turn_records(story: dict, max_history: int) -> list[Record]:
    """The turns of one story (official layout) as records; see the module docstring."""
    annotators = [story["answers"], *story.get("additional_answers", {}).values()]
    records, utterances = [], []
    for i, question in enumerate(story["questions"]):
        utterances.append(question["input_text"])
        golds = [answers[i]["input_text"] for answers in annotators]
        records.append({
            "id": story["id"], "turn_id": int(question["turn_id"]), "source": story["source"],
            "story": story["story"], "question": question["input_text"],
            "history": utterances[-(2 * max_history + 1):], "answer": golds[0], "golds": golds,
        })
        utterances.append(golds[0])
    return records


def _is_story(story: Any) -> bool:
    """Whether `story` has what :func:`turn_records` reads (official layout)."""
    keys = ("id", "source", "story", "questions", "answers")
    return (isinstance(story, dict) and all(k in story for k in keys)
            and isinstance(story["questions"], list) and isinstance(story["answers"], list)
            and len(story["answers"]) >= len(story["questions"]))


def story_from_hub(row: dict, index: int, split: str) -> dict:
    """A hub ``coqa`` row (``source, story, questions[str], answers{input_text, ...}``) in the
    official layout; ids are made up (``<split>-<index>``), there are no additional answers."""
    questions = [{"turn_id": t + 1, "input_text": q} for t, q in enumerate(row["questions"])]
    answers = [{"turn_id": t + 1, "input_text": a} for t, a in enumerate(row["answers"]["input_text"])]
    return {"id": row.get("id") or f"{split}-{index}", "source": row["source"], "story": row["story"],
            "questions": questions, "answers": answers}


class CoQA(NLGTask):
    """CoQA data, its GPT-2 encoding (:mod:`kpeft.tasks.nlg`) and official scorer."""

    special_key = "coqa"

    hub_path, hub_name = "coqa", None
    hub_splits = {"train": "train", "test": "validation"}

    @property
    def layout(self) -> str:  # type: ignore[override]
        return (f"the official CoQA JSON files {self.options.get('train_file', 'coqa-train-v1.0.json')} and "
                f"{self.options.get('dev_file', 'coqa-dev-v1.0.json')}")

    # ------------------------------------------------------------ stories
    def stories(self, split: str) -> list[dict]:
        """The split's dialogues in the official layout (cached)."""
        split = canonical_split(split)
        key = f"stories/{split}"
        if key not in self._records:
            if split == "test":
                self._records[key] = self._read("test")
            else:
                train, validation = self._held_out(self._read("train"))
                self._records["stories/train"], self._records["stories/validation"] = train, validation
        return self._records[key]

    def _read(self, which: str) -> list[dict]:
        if not self.cfg.data_dir:
            ds = self.hub_split(which)
            return [story_from_hub(row, i, self.hub_splits[which]) for i, row in enumerate(ds)]
        name = self.options.get("train_file" if which == "train" else "dev_file",
                                "coqa-train-v1.0.json" if which == "train" else "coqa-dev-v1.0.json")
        path: Path = self.root([name]) / name
        try:
            stories = json.loads(read_text(path))["data"]
            bad = next((i for i, story in enumerate(stories) if not _is_story(story)), None)
            if bad is not None:
                raise KeyError(f"data[{bad}] lacks id, source, story, or an answer per question")
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as err:
            raise KpeftError(f"task 'coqa': '{path}' is not an official CoQA JSON file ({err!r})") from None
        return stories

    def _held_out(self, stories: list[dict]) -> tuple[list[dict], list[dict]]:
        n = int(self.options.get("n_validation", 500))
        if not 0 <= n < len(stories):
            raise KpeftError(f"task 'coqa': cannot hold out {n} of {len(stories)} training dialogues for "
                             f"validation; set task.options.n_validation below {len(stories)}")
        held = set(random.Random(int(self.options.get("split_seed", 0))).sample(range(len(stories)), n))
        return ([s for i, s in enumerate(stories) if i not in held], [s for i, s in enumerate(stories) if i in held])

    # ------------------------------------------------------------ records
    def file_records(self, split: str) -> list[Record]:
        h = int(self.options.get("max_history", 2))
        return [r for story in self.stories(split) for r in turn_records(story, h)]

    hub_records = file_records

    # ------------------------------------------------------------ scoring
    def read_predictions(self, path: str | Path) -> dict:
        path = Path(path)
        if not path.is_file():
            raise KpeftError(f"predictions file '{path}' does not exist")
        try:
            return metric.predictions_from_json(json.loads(read_text(path)))
        except json.JSONDecodeError as err:
            raise KpeftError(f"CoQA predictions '{path}' are not JSON ({err})") from None

    def score(self, predictions: Any, split: str = "test") -> dict[str, Any]:
        if not isinstance(predictions, dict):
            predictions = metric.predictions_from_json(predictions)
        split = canonical_split(split)
        # The official dev file must carry additional_answers; held-out training dialogues have one answer.
        golds, sources = metric.gold_from_json({"data": self.stories(split)},
                                               require_additional=split == "test" and bool(self.cfg.data_dir))
        return metric.evaluate(golds, sources, predictions)

    # ------------------------------------------------------------ GPT-2 encoding (docs/benchmarks.md)
    def target_of(self, record: Record) -> str:
        return record["answer"]

    def segments(self, record: Record, target: str | None) -> list[Segment]:
        """``[<bos_qa>, <document>] + document[:max_document_tokens]`` (typed ``<document>``), the
        history utterances (ending with this question) each ``[<question>]+q`` / ``[<answer>]+a``,
        then ``[<answer>] + answer + [<eos_qa>]``."""
        bos, eos, question, answer, document = (self.sid(t) for t in self.special)
        doc = self.ids(record["story"])[: int(self.options.get("max_document_tokens", 400))]
        segs: list[Segment] = [(document, [bos, document] + doc)]
        history = record["history"]
        for k, utterance in enumerate(history):
            kind = question if (len(history) - 1 - k) % 2 == 0 else answer
            segs.append((kind, [kind] + self.ids(utterance)))
        segs.append((answer, [answer] if target is None else [answer] + self.ids(target) + [eos]))
        return segs

    def score_generations(self, records: list[Record], predictions: list[str]) -> tuple[dict[str, Any], list[dict]]:
        preds = {(r["id"], r["turn_id"]): p for r, p in zip(records, predictions)}
        golds = {(r["id"], r["turn_id"]): r["golds"] for r in records}
        sources = {r["id"]: r["source"] for r in records}
        rows = []
        for r, p in zip(records, predictions):
            em, f1 = metric.turn_score(r["golds"], p)
            rows.append({"id": r["id"], "turn_id": r["turn_id"], "answer": p, "golds": r["golds"], "em": em, "f1": f1})
        return flat_metrics(metric.evaluate(golds, sources, preds)), rows

    def evaluate_generation(self, model, split: str, run_dir=None, batch_size: int = 16,
                            accelerator=None) -> dict[str, Any]:
        """As :meth:`NLGTask.evaluate_generation`, plus the official prediction JSON
        ``<run_dir>/generations/<split>.coqa.json`` (``[{"id", "turn_id", "answer"}]``)."""
        metrics = super().evaluate_generation(model, split, run_dir, batch_size, accelerator)
        if run_dir is not None:
            folder = Path(run_dir) / "generations"
            with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
            official = [{"id": r["id"], "turn_id": r["turn_id"], "answer": r["answer"]} for r in rows]
            (folder / f"{split}.coqa.json").write_text(json.dumps(official), encoding="utf-8")
        return metrics
