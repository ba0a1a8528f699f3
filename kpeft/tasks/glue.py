"""GLUE (He et al. 2022; [KM] App. B.2; [KA] App. D; docs/benchmarks.md): SST-2, MNLI, CoLA, RTE, MRPC, STS-B, QNLI, QQP.

Under ``task.data_dir`` (the task's folder of the GLUE download, e.g. ``glue_data/SST-2``):

| task | files | columns |
|---|---|---|
| SST-2 | ``train.tsv``, ``dev.tsv`` (header) | sentence, label |
| CoLA | ``train.tsv``, ``dev.tsv`` (no header) | source, label, original mark, sentence |
| MNLI | ``train.tsv``, ``dev_matched.tsv``, ``dev_mismatched.tsv`` (header) | sentence1 = col 9, sentence2 = col 10, ``gold_label`` last |
| RTE | ``train.tsv``, ``dev.tsv`` (index, sentence1, sentence2, label) or SuperGLUE's ``train.jsonl``, ``val.jsonl`` (premise, hypothesis, label) | |
| MRPC | ``train.tsv``, ``dev.tsv`` (Quality, #1 ID, #2 ID, #1 String, #2 String), or the raw ``msr_paraphrase_train.txt`` + ``dev_ids.tsv`` (split as GLUE's download script does) | |
| STS-B | ``train.tsv``, ``dev.tsv`` (header; sentence1 = col 8, sentence2 = col 9, score last) | |
| QNLI | ``train.tsv``, ``dev.tsv`` (index, question, sentence, label) | |
| QQP | ``train.tsv``, ``dev.tsv`` (id, qid1, qid2, question1, question2, is_duplicate; short rows skipped) | |

Without ``task.data_dir``: the hub's ``glue`` (config ``sst2``, ``mnli``, ...), adapted to the
same records ``{"idx", "text_a", "text_b", "label"}`` (+ ``"subset"``: matched / mismatched for
MNLI's dev examples); labels are the hub's indices (MNLI: entailment 0, neutral 1,
contradiction 2; QNLI/RTE: entailment 0, not_entailment 1; STS-B: the float score).

Split protocols (``task.options.protocol``):

* ``he`` (He et al., the Kernel-mix / Inducer NLU setting): train = train; validation = test =
  the dev set (MNLI: validation = ``validation_subset`` dev, test = matched then mismatched dev);
* ``krona`` (KronA, following Compacter): small tasks (``task.options.size: small`` — CoLA, RTE,
  MRPC, STS-B): the dev set is permuted with ``torch.randperm`` seeded by ``split_seed`` (42), its
  first half is validation, the rest test; large tasks (SST-2, MNLI, QNLI, QQP): 1,000 permuted
  training examples are held out — as ``test`` (``krona_heldout: test``, [KA] App. D's wording)
  with the dev set as validation, or as ``validation`` with the dev set as test
  (``krona_heldout: validation``, Compacter's code). Derived subsets keep file order.

``task.options.train_file=NAME`` reads the training set from another TSV of the same layout in
``task.data_dir`` (e.g. ``train_subset_2000.tsv``, the SST-2 sample in ``tests/fixtures/glue/SST-2``).

``python -m kpeft.score task=glue_<t> predictions=FILE``: one prediction per test example (a label
index, a label name, or an STS-B score); the task's official metrics (:mod:`kpeft.metrics.glue`).

This class encodes text pairs for a sequence classifier. On a T5 backbone (``task.options.format``
auto, or text2text) the same records and splits are text-to-text instead:
:class:`kpeft.tasks.text2text.GlueText2Text`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kpeft.errors import KpeftError
from kpeft.metrics import glue as metric
from kpeft.tasks import lengths
from kpeft.tasks.base import Example
from kpeft.tasks.benchmark import BenchmarkTask, Record, canonical_split, read_lines, read_text

NLI3 = ("entailment", "neutral", "contradiction")
NLI2 = ("entailment", "not_entailment")


@dataclass(frozen=True)
class GlueSpec:
    name: str  # the hub config and metric name: sst2, mnli, ...
    folder: str  # GLUE's folder name (documentation)
    labels: tuple[str, ...] | None  # label names by index; None = regression (STS-B)
    header: bool = True
    text_cols: tuple[int, int | None] = (0, None)  # sentence1 (and sentence2) column
    label_col: int = -1
    hub_text: tuple[str, str | None] = ("sentence", None)  # the hub's column names
    min_cols: int = 0  # rows with fewer columns are skipped (QQP has a few broken ones)


GLUE_TASKS = {
    "sst2": GlueSpec("sst2", "SST-2", ("0", "1"), text_cols=(0, None), label_col=1),
    "cola": GlueSpec("cola", "CoLA", ("0", "1"), header=False, text_cols=(3, None), label_col=1),
    "mnli": GlueSpec("mnli", "MNLI", NLI3, text_cols=(8, 9), hub_text=("premise", "hypothesis")),
    "rte": GlueSpec("rte", "RTE", NLI2, text_cols=(1, 2), hub_text=("sentence1", "sentence2")),
    "mrpc": GlueSpec("mrpc", "MRPC", ("0", "1"), text_cols=(3, 4), label_col=0, hub_text=("sentence1", "sentence2")),
    "stsb": GlueSpec("stsb", "STS-B", None, text_cols=(7, 8), hub_text=("sentence1", "sentence2")),
    "qnli": GlueSpec("qnli", "QNLI", NLI2, text_cols=(1, 2), hub_text=("question", "sentence")),
    "qqp": GlueSpec("qqp", "QQP", ("0", "1"), text_cols=(3, 4), label_col=5, hub_text=("question1", "question2"),
                    min_cols=6),
}


def _label(spec: GlueSpec, value: str, where: str) -> int | float:
    value = value.strip()
    if spec.labels is None:
        try:
            return float(value)
        except ValueError:
            raise KpeftError(f"{where}: '{value}' is not an STS-B score") from None
    if value in spec.labels:
        return spec.labels.index(value)
    try:
        index = int(value)
    except ValueError:
        index = -1
    if not 0 <= index < len(spec.labels):
        raise KpeftError(f"{where}: label '{value}' is not one of {', '.join(spec.labels)} (or their indices)")
    return index


def read_tsv(path: Path, spec: GlueSpec, subset: str | None = None) -> list[Record]:
    """A GLUE TSV (no quoting: fields are split on tabs) as records."""
    rows = [line.rstrip("\r\n").split("\t") for line in io.StringIO(read_text(path, "utf-8-sig"))]
    if spec.header:
        rows = rows[1:]
    a, b = spec.text_cols
    out = []
    for i, row in enumerate(rows):
        if row == [""] or (spec.min_cols and len(row) < spec.min_cols):
            continue
        try:
            rec = {"idx": len(out), "text_a": row[a], "text_b": row[b] if b is not None else None,
                   "label": _label(spec, row[spec.label_col], f"{path.name} line {i + 1 + spec.header}")}
        except IndexError:
            raise KpeftError(f"{path.name} line {i + 1 + spec.header} has {len(row)} columns; is it GLUE's "
                             f"{spec.folder} layout?") from None
        if subset:
            rec["subset"] = subset
        out.append(rec)
    return out


def read_jsonl(path: Path, spec: GlueSpec) -> list[Record]:
    """SuperGLUE's RTE layout (``premise``, ``hypothesis``, ``label``)."""
    out = []
    for i, line in enumerate(io.StringIO(read_text(path))):
        if line.strip():
            try:
                row = json.loads(line)
                texts = row["premise"], row["hypothesis"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise KpeftError(f"{path.name} line {i + 1} is not a JSON object with premise, hypothesis, label "
                                 f"({err!r}); is it SuperGLUE's RTE layout?") from None
            out.append({"idx": len(out), "text_a": texts[0], "text_b": texts[1],
                        "label": _label(spec, str(texts[2]), f"{path.name} line {i + 1}")})
    return out


def read_mrpc_raw(root: Path, spec: GlueSpec) -> dict[str, list[Record]]:
    """MRPC from ``msr_paraphrase_train.txt`` + ``dev_ids.tsv``: GLUE's train / dev split."""
    dev_ids = {tuple(line.split("\t")[:2]) for line in read_lines(root / "dev_ids.tsv") if line.strip()}
    rows = read_tsv(root / "msr_paraphrase_train.txt", spec)
    lines = list(io.StringIO(read_text(root / "msr_paraphrase_train.txt", "utf-8-sig")))
    ids = [tuple(line.rstrip("\r\n").split("\t")[1:3]) for line in lines[1:] if line.strip()]
    train = [r for r, key in zip(rows, ids) if key not in dev_ids]
    dev = [r for r, key in zip(rows, ids) if key in dev_ids]
    return {"train": _reindex(train), "dev": _reindex(dev)}


def _reindex(records: list[Record]) -> list[Record]:
    return [{**r, "idx": i} for i, r in enumerate(records)]


def permutation(n: int, seed: int) -> list[int]:
    """Compacter's shuffled indices: ``torch.randperm(n)`` from a generator seeded with `seed`."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


class Glue(BenchmarkTask):
    """One GLUE task; ``task.options.glue_task`` names it (see the module docstring)."""

    hub_path = "glue"

    @property
    def spec(self) -> GlueSpec:
        name = self.options.get("glue_task")
        if name not in GLUE_TASKS:
            raise KpeftError(f"task '{self.name}': task.options.glue_task must be one of {', '.join(GLUE_TASKS)}")
        return GLUE_TASKS[name]

    @property
    def hub_name(self) -> str:  # type: ignore[override]
        return self.spec.name

    @property
    def layout(self) -> str:  # type: ignore[override]
        dev = "dev_matched.tsv and dev_mismatched.tsv" if self.spec.name == "mnli" else "dev.tsv"
        extra = {"rte": " (or train.jsonl and val.jsonl)",
                 "mrpc": " (or msr_paraphrase_train.txt and dev_ids.tsv)"}.get(self.spec.name, "")
        return f"GLUE's {self.spec.folder} files train.tsv and {dev}{extra}"

    # ------------------------------------------------------------ the official train / dev sets
    def official(self, which: str) -> list[Record]:
        """GLUE's own ``train`` or ``dev`` set (MNLI's dev = matched then mismatched)."""
        key = f"official/{which}"
        if key not in self._records:
            self._records[key] = self._read_files(which) if self.cfg.data_dir else self._read_hub(which)
        return self._records[key]

    def _read_files(self, which: str) -> list[Record]:
        spec, root = self.spec, self.root()
        if spec.name == "mnli" and which == "dev":
            self.root(["dev_matched.tsv", "dev_mismatched.tsv"])
            return _reindex(read_tsv(root / "dev_matched.tsv", spec, "matched")
                            + read_tsv(root / "dev_mismatched.tsv", spec, "mismatched"))
        if which == "train" and self.options.get("train_file"):  # e.g. a subset of train.tsv
            return read_tsv(self.root([self.options.train_file]) / self.options.train_file, spec)
        if (root / f"{which}.tsv").is_file():
            return read_tsv(root / f"{which}.tsv", spec)
        if spec.name == "rte" and (root / f"{'val' if which == 'dev' else which}.jsonl").is_file():
            return read_jsonl(root / f"{'val' if which == 'dev' else which}.jsonl", spec)
        if spec.name == "mrpc" and (root / "msr_paraphrase_train.txt").is_file() and (root / "dev_ids.tsv").is_file():
            return read_mrpc_raw(root, spec)[which]
        raise KpeftError(f"task '{self.name}': task.data_dir '{root}' lacks {which}.tsv; it should hold {self.layout}")

    def _read_hub(self, which: str) -> list[Record]:
        ds = self.hub()
        if self.spec.name == "mnli" and which == "dev":
            rows = [(r, "matched") for r in ds["validation_matched"]] + [(r, "mismatched") for r in ds["validation_mismatched"]]
        else:
            rows = [(r, None) for r in ds["train" if which == "train" else "validation"]]
        return [self.record_from_hub(r, i, subset) for i, (r, subset) in enumerate(rows)]

    def record_from_hub(self, row: dict, index: int, subset: str | None = None) -> Record:
        a, b = self.spec.hub_text
        rec = {"idx": index, "text_a": row[a], "text_b": row[b] if b else None,
               "label": float(row["label"]) if self.spec.labels is None else int(row["label"])}
        if subset:
            rec["subset"] = subset
        return rec

    # ------------------------------------------------------------ split protocols
    def file_records(self, split: str) -> list[Record]:
        return self._protocol_split(split)

    hub_records = file_records

    def _protocol_split(self, split: str) -> list[Record]:
        protocol = self.options.get("protocol", "he")
        train, dev = self.official("train"), self.official("dev")
        if protocol == "he":
            if split == "train":
                return train
            if split == "validation" and self.spec.name == "mnli":
                wanted = self.options.get("validation_subset", "matched")
                return _reindex([r for r in dev if r["subset"] == wanted])
            return dev
        if protocol != "krona":
            raise KpeftError(f"task '{self.name}': task.options.protocol must be he or krona, not '{protocol}'")
        seed = int(self.options.get("split_seed", 42))
        if self.options.get("size", "small") == "small":
            perm = permutation(len(dev), seed)
            half = set(perm[: len(dev) // 2])
            if split == "train":
                return train
            keep = (lambda i: i in half) if split == "validation" else (lambda i: i not in half)
            return _reindex([r for i, r in enumerate(dev) if keep(i)])
        n_held = int(self.options.get("krona_heldout_size", 1000))
        role = self.options.get("krona_heldout", "test")
        if role not in ("test", "validation"):
            raise KpeftError(f"task '{self.name}': task.options.krona_heldout must be test or validation")
        held = set(permutation(len(train), seed)[:n_held])
        if split == "train":
            return _reindex([r for i, r in enumerate(train) if i not in held])
        if split == role:
            return _reindex([r for i, r in enumerate(train) if i in held])
        return dev

    # ------------------------------------------------------------ scoring
    def score(self, predictions: list[str], split: str = "test") -> dict[str, Any]:
        split = canonical_split(split)
        records = self.records(split)
        self.check_count(predictions, len(records), "examples", split)
        preds = [_label(self.spec, p, f"predictions line {i + 1}") for i, p in enumerate(predictions)]
        subsets = [r.get("subset", "") for r in records] if self.spec.name == "mnli" else None
        return metric.glue_metrics(self.spec.name, preds, [r["label"] for r in records], subsets)

    # ------------------------------------------------------------ training (sequence classification)
    def load_splits(self) -> dict[str, list[Example]]:
        """Encoded splits for a sequence classifier (text pairs through the model's tokenizer)."""
        if self.tokenizer is None:
            raise KpeftError(f"task '{self.name}' needs the model's tokenizer")
        out, counts = {}, {}
        for split in ("train", "validation", "test"):
            records = self.records(split)
            a = [r["text_a"] for r in records]
            b = [r["text_b"] for r in records] if self.spec.hub_text[1] else None
            enc = self.tokenize_fitted(a, b, split, counts)
            out[split] = [
                {"input_ids": ids, "label": r["label"], **({"subset": int(r["subset"] == "mismatched")} if "subset" in r else {})}
                for ids, r in zip(enc, records)
            ]
        lengths.warn_truncated(counts, self.input_limit())
        return out

    def collate(self, examples):
        batch = super().collate(examples)
        if "subset" in examples[0]:
            batch["subset"] = torch.tensor([e["subset"] for e in examples], dtype=torch.long)
        return batch

    @torch.no_grad()
    def batch_metrics(self, model, batch) -> dict[str, float]:
        """Summable statistics of the task's metrics (confusion counts, or moments for STS-B)."""
        logits, labels = self.logits_and_labels(model, batch)
        if self.spec.labels is None:
            x, y = logits.squeeze(-1).double(), labels.double()
            return {"n": float(y.numel()), "sx": float(x.sum()), "sy": float(y.sum()), "sxx": float((x * x).sum()),
                    "syy": float((y * y).sum()), "sxy": float((x * y).sum())}
        pred = logits.argmax(-1)
        hit = pred == labels
        stats = {"n": float(labels.numel()), "correct": float(hit.sum())}
        if len(self.spec.labels) == 2:
            p, t = pred == 1, labels == 1
            stats.update(tp=float((p & t).sum()), fp=float((p & ~t).sum()), fn=float((~p & t).sum()),
                         tn=float((~p & ~t).sum()))
        if "subset" in batch:
            mm = batch["subset"] == 1
            stats.update(n_m=float((~mm).sum()), correct_m=float((hit & ~mm).sum()),
                         n_mm=float(mm.sum()), correct_mm=float((hit & mm).sum()))
        return stats

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        """The task's metrics from :meth:`batch_metrics` totals, by the formula ``kpeft.score`` uses
        too (:func:`kpeft.metrics.glue.metrics_from_stats`; STS-B: Pearson only, as Spearman needs
        ranks, which ``python -m kpeft.score`` computes)."""
        return metric.metrics_from_stats(totals)
