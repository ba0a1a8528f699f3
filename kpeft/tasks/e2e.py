"""The E2E NLG Challenge (Novikova et al. 2017): restaurant meaning representations → text, the
GPT-2 task of the LoRA and prefix-tuning tables, scored by the challenge's official metrics.

Under ``task.data_dir``: the challenge's CSVs (columns ``mr``, ``ref``; one row per MR × human
reference) ``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv`` (other names, e.g. the cleaned
E2E's, via ``task.options.{train,validation,test}_file``). They are read as the official scorer
reads them (four mis-encodings repaired, :func:`kpeft.metrics.e2e.fix_encoding`). Without
``task.data_dir``, the hub's ``e2e_nlg`` (``meaning_representation``, ``human_reference``), or a
GEM-style copy (``meaning_representation``, ``target``, ``references``) named by
``task.options.hub_path``, adapted to the same records.

Records:

* a **pair** (``records("train")``, ``records("validation")``; the training examples): one per
  (MR, reference) row: ``{"id", "mr", "slots", "target"}``, ``slots`` = ``[[attribute, value], …]``
  parsed from ``name[The Eagle], eatType[coffee shop], …`` in MR order;
* an **MR** (:meth:`E2E.mrs`, and ``records("test")``): one per group of consecutive rows sharing
  an MR, in first-appearance order, with all its references: ``{"id", "mr", "slots",
  "references"}`` (test: 630 MRs, 4,693 references; dev: 547, 4,672).

Encoding (the WebNLG style of :mod:`kpeft.tasks.nlg`): ``[<bos_e2e>]``, per slot
``[<attribute>] + attribute`` and ``[<value>] + value``, then ``[<target_e2e>] + text +
[<eos_e2e>]``; each segment typed by its special token (the task embeddings). Generation: one
output per MR, greedy by default; the LoRA paper's beam search (Hu et al. 2021, ``gpt2_beam.py``:
beam 10, length penalty 0.8, no repeated 4-grams) is ``decode.num_beams=10
decode.length_penalty=0.8 decode.no_repeat_ngram_size=4`` (``docs/decoding.md``).

``python -m kpeft.score task=e2e predictions=FILE``: one output line per test MR, in order; BLEU,
NIST, METEOR, ROUGE-L, CIDEr (:mod:`kpeft.metrics.e2e`).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from kpeft.errors import KpeftError
from kpeft.metrics import e2e as metric
from kpeft.tasks.benchmark import Record, canonical_split, read_text
from kpeft.tasks.nlg import NLGTask, Segment, flat_metrics

FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
_SLOT = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> list[list[str]]:
    """``"name[The Eagle], eatType[coffee shop]"`` → ``[["name", "The Eagle"], ["eatType", "coffee shop"]]``."""
    slots, pos = [], 0
    while pos < len(mr):
        found = _SLOT.match(mr, pos)
        if found is None or found.end() == pos:
            raise KpeftError(f"E2E MR '{mr}' is not a list of attribute[value] separated by commas")
        slots.append([found.group(1), found.group(2)])
        pos = found.end()
    if not slots:
        raise KpeftError("an E2E MR is empty")
    return slots


def read_csv(path: Path) -> list[tuple[str, str]]:
    """(MR, reference) rows of an E2E CSV with ``mr`` and ``ref`` columns, repaired as the official
    scorer repairs them; blank lines skipped."""
    text = metric.fix_encoding(read_text(path, "utf-8-sig"))
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "mr" not in header or "ref" not in header:
        raise KpeftError(f"E2E file '{path}' should start with the header 'mr,ref' (it has {rows[0] if rows else 'nothing'})")
    i, j = header.index("mr"), header.index("ref")
    bad = [n for n, row in enumerate(rows[1:], start=2) if len(row) != len(header)]
    if bad:
        raise KpeftError(f"E2E file '{path}': row {bad[0]} has not {len(header)} columns")
    return [(row[i].strip(), row[j].strip()) for row in rows[1:]]


def pairs_from_hub(row: dict) -> list[tuple[str, str]]:
    """(MR, reference) pairs of a hub row: ``e2e_nlg`` (``human_reference``) or GEM
    (``references`` when given, else ``target``)."""
    mr = row["meaning_representation"]
    if "human_reference" in row:
        return [(mr, row["human_reference"])]
    refs = row.get("references") or [row["target"]]
    return [(mr, r) for r in refs]


def group_mrs(pairs: list[tuple[str, str]]) -> list[Record]:
    """One MR record per run of consecutive rows sharing an MR, with all their references (the
    official scorer's grouping of a reference file)."""
    out: list[Record] = []
    for mr, ref in pairs:
        if not out or out[-1]["mr"] != mr:
            out.append({"id": f"mr{len(out)}", "mr": mr, "slots": parse_mr(mr), "references": []})
        out[-1]["references"].append(ref)
    return out


class E2E(NLGTask):
    """E2E NLG Challenge data, its GPT-2 encoding (:mod:`kpeft.tasks.nlg`) and official metrics."""

    special_key = "e2e"
    layout = ("the E2E NLG Challenge CSVs (columns mr,ref): trainset.csv, devset.csv, testset_w_refs.csv "
              "(from github.com/tuetschek/e2e-dataset)")
    hub_path = "e2e_nlg"

    def __init__(self, cfg, tokenizer=None, pad_token_id: int = 0):
        super().__init__(cfg, tokenizer, pad_token_id)
        self.hub_path = self.options.get("hub_path") or type(self).hub_path

    # ------------------------------------------------------------ records
    def pairs(self, split: str) -> list[tuple[str, str]]:
        """The split's (MR, reference) rows in file order."""
        split = canonical_split(split)
        key = f"pairs/{split}"
        if key not in self._records:
            if self.cfg.data_dir:
                name = self.options.get(f"{split}_file") or FILES[split]
                rows = read_csv(self.root([name]) / name)
            else:
                rows = [p for row in self.hub_split(split) for p in pairs_from_hub(row)]
            self._records[key] = rows
        return self._records[key]

    def mrs(self, split: str) -> list[Record]:
        """One record per MR (consecutive rows grouped), in first-appearance order, with all references."""
        split = canonical_split(split)
        key = f"mrs/{split}"
        if key not in self._records:
            self._records[key] = group_mrs(self.pairs(split))
        return self._records[key]

    def examples(self, split: str) -> list[Record]:
        """One training example per (MR, reference) row."""
        return [{"id": f"{m['id']}/{k}", "mr": m["mr"], "slots": m["slots"], "target": ref}
                for m in self.mrs(split) for k, ref in enumerate(m["references"])]

    def file_records(self, split: str) -> list[Record]:
        return self.mrs(split) if split == "test" else self.examples(split)

    hub_records = file_records

    def loss_records(self, split: str) -> list[Record]:
        split = canonical_split(split)
        return self.examples(split) if split == "test" else self.records(split)

    def generation_records(self, split: str) -> list[Record]:
        """One generation per MR, scored against all its references."""
        return self.mrs(split)

    # ------------------------------------------------------------ scoring
    def _metric_options(self) -> dict[str, Any]:
        return {"meteor": self.options.get("meteor", "jar"), "coco": bool(self.options.get("coco_metrics", True))}

    score_units = "MRs"

    def score_generations(self, records: list[Record], predictions: list[str]) -> tuple[dict[str, Any], list[dict]]:
        scores, each = metric.score_corpus(predictions, [m["references"] for m in records], **self._metric_options())
        rows = [{"id": m["id"], "mr": m["mr"], "prediction": p, "references": m["references"], **s}
                for m, p, s in zip(records, predictions, each)]
        return flat_metrics(scores), rows

    # ------------------------------------------------------------ GPT-2 encoding
    def target_of(self, record: Record) -> str:
        return record["target"]

    def segments(self, record: Record, target: str | None) -> list[Segment]:
        """``[<bos_e2e>]``, per slot ``[<attribute>]+attribute`` and ``[<value>]+value``, then
        ``[<target_e2e>] + target + [<eos_e2e>]``; each segment typed by its special token."""
        bos, eos, attribute, value, tgt = (self.sid(t) for t in self.special)
        segs: list[Segment] = [(bos, [bos])]
        for a, v in record["slots"]:
            segs += [(attribute, [attribute] + self.ids(a)), (value, [value] + self.ids(v))]
        segs.append((tgt, [tgt] if target is None else [tgt] + self.ids(target) + [eos]))
        return segs
