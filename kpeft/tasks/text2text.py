"""GLUE as text-to-text for T5 (the KronA / Compacter protocol; [KA] App. D).

**Format** — T5's own (Raffel et al. 2020, Appendix D; the ``glue`` preprocessor of
``google-research/text-to-text-transfer-transformer``): the input is the task name, then each text
field as ``<name>: <text>``, fields in sorted name order, joined by single spaces; the target is the
label's name in TFDS ``glue`` (T5's label words)::

    sst2 sentence: <s>                          → negative | positive
    cola sentence: <s>                          → unacceptable | acceptable
    mnli hypothesis: <h> premise: <p>           → entailment | neutral | contradiction
    rte sentence1: <s1> sentence2: <s2>         → entailment | not_entailment
    qnli question: <q> sentence: <s>            → entailment | not_entailment
    mrpc sentence1: <s1> sentence2: <s2>        → not_equivalent | equivalent
    qqp question1: <q1> question2: <q2>         → not_duplicate | duplicate
    stsb sentence1: <s1> sentence2: <s2>        → the score rounded to the nearest 0.2, "%.1f" ("3.8")

STS-B rounds ``round(5·y) / 5`` half to even, as ``tf.round`` does in T5. The tokenizer appends
``</s>`` to both sides; the loss is on the target tokens (and ``</s>``).
``task.options.targets=indices`` uses the label index as the target text instead ("0", "1", "2"),
as the Compacter code does (which also orders MNLI premise first; we keep T5's order).

**Evaluation** — greedy decoding with the cache (:func:`~kpeft.training.decode.greedy_decode_seq2seq`;
beam search with ``decode.num_beams`` > 1, ``docs/decoding.md``), at most ``max_new_tokens`` tokens
(``decode.max_new_tokens``, else ``task.options.max_new_tokens``, else the longest target plus ``</s>``, so a label word
followed by more text is not a label word); the output string is mapped back to a label as T5's
post-processors do, and an output that is no label (an *invalid* output) counts as wrong:

* classification: the label index, or −1 (never equal to a label; Matthews correlation treats it
  as one more class, as sklearn does in T5's metric);
* MRPC, QQP (F1): the opposite of the gold label (T5's ``f1_score_with_invalid``; the Compacter code
  does the same);
* STS-B: the number, or −1.0 (T5's ``string_to_float`` default); a correlation of constant
  predictions is 0 (T5, Compacter), not NaN.

The official metrics come from :mod:`kpeft.metrics.glue`, plus ``invalid`` (% of invalid outputs).
MNLI reports ``accuracy`` over the whole split, and ``mnli_m`` / ``mnli_mm`` where the split is the
dev set (He et al.'s protocol); under the KronA protocol MNLI's test set is 1,000 held-out training
pairs. Every test example's output, value, label and score (1/0, STS-B −squared error) goes to
``<run_dir>/predictions/<split>.jsonl`` (the rows of the classification path plus ``output``).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kpeft.errors import KpeftError
from kpeft.metrics import glue as metric
from kpeft.tasks import lengths
from kpeft.tasks.base import Example, Task
from kpeft.tasks.benchmark import SPLITS, Record, canonical_split
from kpeft.tasks.glue import NLI2, NLI3, Glue
from kpeft.tasks.nlg import gather_in_order

log = logging.getLogger(__name__)

# T5's label words (TFDS glue label names), by label index.
LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "cola": ("unacceptable", "acceptable"),
    "mnli": NLI3,
    "rte": NLI2,
    "qnli": NLI2,
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
}
# (field name, record key) in T5's order: the field names sorted.
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "sst2": (("sentence", "text_a"),),
    "cola": (("sentence", "text_a"),),
    "mnli": (("hypothesis", "text_b"), ("premise", "text_a")),
    "rte": (("sentence1", "text_a"), ("sentence2", "text_b")),
    "qnli": (("question", "text_a"), ("sentence", "text_b")),
    "mrpc": (("sentence1", "text_a"), ("sentence2", "text_b")),
    "qqp": (("question1", "text_a"), ("question2", "text_b")),
    "stsb": (("sentence1", "text_a"), ("sentence2", "text_b")),
}
F1_TASKS = ("mrpc", "qqp")
TARGETS = ("words", "indices")


def text2text_format(options) -> bool:
    """Whether a GLUE task is text-to-text: ``task.options.format`` text2text, or auto (the
    default) on a T5 backbone (``options.model_family``, filled in from ``model.family``)."""
    fmt = options.get("format", "auto")
    if fmt not in ("auto", "classification", "text2text"):
        raise KpeftError(f"task.options.format must be auto, classification or text2text, not '{fmt}'")
    return fmt == "text2text" or (fmt == "auto" and options.get("model_family") == "t5")


def source_text(task: str, record: Record) -> str:
    """T5's input string of a GLUE record, e.g. ``mnli hypothesis: … premise: …``."""
    return " ".join([task] + [f"{name}: {record[key]}" for name, key in FIELDS[task]])


def stsb_text(score: float) -> str:
    """An STS-B score as T5's target: rounded to the nearest 0.2 (half to even), one decimal."""
    return f"{round(score * 5) / 5:.1f}"


def target_text(task: str, label: int | float, targets: str = "words") -> str:
    """The target string of a label (index, or the STS-B score)."""
    if task == "stsb":
        return stsb_text(float(label))
    return LABEL_WORDS[task][int(label)] if targets == "words" else str(int(label))


def target_vocabulary(task: str, targets: str = "words") -> list[str]:
    """Every target string the task can have (STS-B: 0.0, 0.2, …, 5.0)."""
    if task == "stsb":
        return [stsb_text(i / 5) for i in range(26)]
    return [target_text(task, i, targets) for i in range(len(LABEL_WORDS[task]))]


def parse_output(task: str, text: str, targets: str = "words") -> int | float | None:
    """The label a decoded string names (an index, or the STS-B number); None if it names none."""
    text = text.strip()
    if task == "stsb":
        try:
            value = float(text)
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    vocab = target_vocabulary(task, targets)
    return vocab.index(text) if text in vocab else None


def output_values(task: str, texts: Sequence[str], labels: Sequence, targets: str = "words") -> tuple[list, list[bool]]:
    """The metric inputs of decoded strings and whether each was valid (see the module docstring
    for the value an invalid output gets)."""
    preds, valid = [], []
    for text, label in zip(texts, labels, strict=True):
        value = parse_output(task, text, targets)
        valid.append(value is not None)
        if value is None:
            value = -1.0 if task == "stsb" else (1 - int(label) if task in F1_TASKS else -1)
        preds.append(value)
    return preds, valid


def text2text_metrics(task: str, preds: Sequence, labels: Sequence, subsets: Sequence[str] | None = None) -> dict[str, float]:
    """The official GLUE metrics of mapped outputs (MNLI: accuracy, and matched / mismatched
    accuracy where `subsets` says which is which); NaN correlations are 0."""
    if task == "mnli":
        out = {"accuracy": metric.accuracy(preds, labels)}
        if subsets is not None and any(subsets):
            out.update(metric.glue_metrics("mnli", preds, labels, subsets))
        return out
    with warnings.catch_warnings():  # constant predictions: scipy warns and returns NaN, reported as 0
        warnings.simplefilter("ignore", RuntimeWarning)
        scores = metric.glue_metrics(task, preds, labels)
    return {k: 0.0 if math.isnan(v) else v for k, v in scores.items()}


def example_score(task: str, pred, label) -> float:
    """Per-example score for paired tests: 1/0 correct, STS-B −squared error."""
    return -((float(pred) - float(label)) ** 2) if task == "stsb" else float(pred == label)


class GlueText2Text(Glue):
    """A GLUE task as text-to-text for an encoder-decoder (see the module docstring): the same
    records and split protocols as :class:`~kpeft.tasks.glue.Glue`, encoded in T5's format."""

    generates = True

    @property
    def kind(self) -> str:
        return "seq2seq"

    @property
    def targets(self) -> str:
        targets = self.options.get("targets", "words")
        if targets not in TARGETS:
            raise KpeftError(f"task.options.targets must be words or indices, not '{targets}'")
        return targets

    def _cap(self, items: list, split: str) -> list:
        """The first ``cap`` records; where records name a subset (MNLI matched / mismatched), the
        cap is shared evenly between the subsets so that every subset's metric exists."""
        cap = self.options.get("max_train_examples" if split == "train" else "max_eval_examples")
        if cap is None:
            return items
        subsets = list(dict.fromkeys(r.get("subset", "") for r in items))
        if len(subsets) < 2:
            return items[: int(cap)]
        per = -(-int(cap) // len(subsets))
        keep = {s: set([i for i, r in enumerate(items) if r.get("subset", "") == s][:per]) for s in subsets}
        return [r for i, r in enumerate(items) if i in keep[r.get("subset", "")]][: int(cap)]

    def encode(self, records: Sequence[Record], split: str = "test",
               counts: dict[str, tuple[int, int]] | None = None) -> list[Example]:
        """Input ids of :func:`source_text` (truncated to ``task.max_length``, see
        :mod:`kpeft.tasks.lengths`; ``counts[split]`` = examples cut, examples) and label ids of
        :func:`target_text`, both ending with ``</s>``."""
        if self.tokenizer is None:
            raise KpeftError(f"task '{self.name}' needs the model's tokenizer")
        name = self.spec.name
        sources = self.tokenize_fitted([source_text(name, r) for r in records], None, split,
                                       {} if counts is None else counts)
        targets = self.tokenizer([target_text(name, r["label"], self.targets) for r in records])["input_ids"]
        return [{"input_ids": s, "labels": t, **({"subset": int(r["subset"] == "mismatched")} if "subset" in r else {})}
                for s, t, r in zip(sources, targets, records)]

    def load_splits(self) -> dict[str, list[Example]]:
        """Encoded splits, capped by ``task.options.max_train_examples`` / ``max_eval_examples``."""
        counts: dict[str, tuple[int, int]] = {}
        self._encoded = {split: self.encode(self._cap(self.records(split), split), split, counts) for split in SPLITS}
        lengths.warn_truncated(counts, self.input_limit())
        return self._encoded

    # Teacher-forced token accuracy, if anything asks (evaluation generates, see below).
    batch_metrics = Task.batch_metrics
    finalize = Task.finalize

    # ------------------------------------------------------------ generation and scoring
    def max_new_tokens(self) -> int:
        """``decode.max_new_tokens``, else ``task.options.max_new_tokens``, else the longest target's
        token count (with ``</s>``)."""
        if self.decoding.max_new_tokens is not None:
            return self.decoding.max_new_tokens
        if self.options.get("max_new_tokens"):
            return int(self.options.max_new_tokens)
        return max(len(ids) for ids in self.tokenizer(target_vocabulary(self.spec.name, self.targets))["input_ids"])

    def generate(self, model, examples: Sequence[Example], batch_size: int = 16) -> list[str]:
        """Greedy (or, with ``decode.num_beams`` > 1, beam-search) outputs (decoded strings) for encoded examples."""
        from kpeft.training.decode import decode_seq2seq

        outputs = decode_seq2seq(
            model, [e["input_ids"] for e in examples], self.decoding, max_new_tokens=self.max_new_tokens(),
            stop_ids=[self.tokenizer.eos_token_id], pad_id=self.pad_token_id, batch_size=batch_size,
        )
        return [self.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]

    @torch.no_grad()
    def evaluate_generation(self, model, split: str, run_dir: str | Path | None = None,
                            batch_size: int = 16, accelerator=None) -> dict[str, Any]:
        """Generate for the split, map the outputs to labels, score them officially and write
        ``<run_dir>/predictions/<split>.jsonl``. With an `accelerator` of several processes, process
        r decodes examples r, r + world, …; the main process scores them all (as one process would)."""
        model.eval()
        split = canonical_split(split)
        records = self._cap(self.records(split), split)
        if self.generation_limit:  # validation by a metric (train.val_generation_examples)
            records = records[: int(self.generation_limit)]
        if not records:
            return {}
        encoded = getattr(self, "_encoded", {}).get(split) or self.encode(records, split)
        batch_size = int(self.options.get("generation_batch_size") or batch_size)
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        texts = gather_in_order(self.generate(getattr(model, "module", model), encoded[rank::world], batch_size),
                                rank, world)
        metrics: dict[str, Any] = {}
        if rank == 0:
            metrics = self.score_outputs(records, texts, run_dir, split)
        if world > 1:
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics])[0]
        return metrics

    def score_outputs(self, records: Sequence[Record], texts: Sequence[str], run_dir: str | Path | None = None,
                      split: str = "test") -> dict[str, float]:
        """The metrics of decoded strings (and ``invalid``, their % that name no label); with
        `run_dir`, one row per example in ``<run_dir>/predictions/<split>.jsonl``."""
        name, labels = self.spec.name, [r["label"] for r in records]
        preds, valid = output_values(name, texts, labels, self.targets)
        subsets = [r.get("subset", "") for r in records] if name == "mnli" else None
        metrics = text2text_metrics(name, preds, labels, subsets)
        metrics["invalid"] = 100.0 * valid.count(False) / len(valid)
        if run_dir is not None:
            rows = [{"index": i, "prediction": p, "label": y, "score": example_score(name, p, y), "output": t}
                    for i, (p, y, t) in enumerate(zip(preds, labels, texts))]
            _write_rows(Path(run_dir) / "predictions" / f"{split}.jsonl", rows)
        return metrics

    def score(self, predictions: list[str], split: str = "test") -> dict[str, Any]:
        """Official metrics of a predictions file whose lines may also be T5 outputs (label words)."""
        mapped = [str(v) if (v := parse_output(self.spec.name, p, self.targets)) is not None else p for p in predictions]
        return super().score(mapped, split)


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    log.info("%d predictions written to %s", len(rows), path)
