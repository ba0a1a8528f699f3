"""WebNLG 2017 (the challenge data prefix-tuning and the Kernel-mix / Inducer code used; docs/benchmarks.md).

Under ``task.data_dir``, either layout (per split, XML first):

* the challenge XML: ``train/<n>triples/*.xml``, ``dev/<n>triples/*.xml`` (read in order of n, then
  file name) and ``test/testdata_with_lex.xml``;
* prefix-tuning's JSON: ``train.json``, ``dev.json``, ``test.json``
  (``{"entries": [{"1": {"category", "size", "modifiedtripleset", "lexicalisations", ...}}, ...]}``).

Both give the same entries in the same order (``tests/test_tasks_webnlg.py``). Without
``task.data_dir`` the hub's ``web_nlg`` / ``webnlg_challenge_2017`` is read and adapted.

Records:

* an **entry** (:meth:`WebNLG.entries`): ``{"id", "eid", "category", "subset", "size", "triples",
  "lexes", "references"}``, ``triples`` from ``modifiedtripleset`` (raw strings, underscores kept),
  ``references`` = every lexicalisation's text in file order (the scorer uses the first three);
* a **training example** (``records("train")`` / ``records("validation")``): one per (entry,
  lexicalisation) whose ``comment`` is ``"good"`` where that attribute exists:
  ``{"id", "eid", "category", "subset", "triples", "target"}``;
* ``records("test")`` = the test entries, one per line of a predictions file, in official XML order.

Options ``dev_into_train`` (a fraction of every (category, size) stratum of dev moves to train) and
``test_subset`` (a stratified sample of the test entries) select entries deterministically
(:func:`select_entries`; ``conf/experiment/nlg_mini.yaml`` uses both).

``python -m kpeft.score task=webnlg predictions=FILE``: one output line per test entry (or a run's
``generations/test.jsonl``); BLEU,
METEOR, TER on SEEN / UNSEEN / ALL (:mod:`kpeft.metrics.webnlg`; ``task.options.meteor``:
``jar`` | ``approx`` | ``off``).
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kpeft import datafiles
from kpeft.errors import KpeftError
from kpeft.metrics import webnlg as metric
from kpeft.tasks.benchmark import Record, canonical_split, read_text
from kpeft.tasks.nlg import NLGTask, Segment, flat_metrics

XML_DIRS = {"train": "train", "validation": "dev"}
TEST_XML = "test/testdata_with_lex.xml"
JSON_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}


def _entry(key: str, eid: str, category: str, size: Any, triples: list[list[str]], lexes: list[dict]) -> Record:
    return {
        "id": key,
        "eid": eid,
        "category": category,
        "subset": metric.subset_of(category),
        "size": int(size),
        "triples": triples,
        "lexes": lexes,
        "references": [lex["text"] for lex in lexes],
    }


def _triple(text: str) -> list[str]:
    parts = text.strip().split(" | ")
    if len(parts) != 3:
        raise KpeftError(f"WebNLG triple '{text}' is not 'subject | property | object'")
    return parts


def entries_from_xml(path: Path, prefix: str = "") -> list[Record]:
    """The entries of one challenge XML file, in file order (entries without a lexicalisation are
    skipped, as the challenge's reader skips them)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise KpeftError(f"WebNLG file '{path}' is not valid XML ({err})") from None
    datafiles.note_file(path)
    out = []
    for xml_entry in root.iter("entry"):
        lexes = [
            {"text": lex.text or "", "comment": lex.get("comment"), "lid": lex.get("lid")}
            for lex in xml_entry.findall("lex")
        ]
        if not lexes:
            continue
        mts = xml_entry.find("modifiedtripleset")
        triples = [_triple(t.text or "") for t in (mts.findall("mtriple") if mts is not None else [])]
        eid = xml_entry.get("eid", "")
        out.append(_entry(f"{prefix}{eid}", eid, xml_entry.get("category", ""), xml_entry.get("size", len(triples)),
                          triples, lexes))
    return out


def _size_of(folder: Path) -> tuple[int, str]:
    found = re.match(r"(\d+)", folder.name)
    return (int(found.group(1)) if found else 1 << 30, folder.name)


def entries_from_xml_dir(folder: Path) -> list[Record]:
    """``<n>triples/*.xml`` under `folder`, by n then file name (the prefix-tuning JSON's order)."""
    files = [f for d in sorted((d for d in folder.iterdir() if d.is_dir()), key=_size_of) for f in sorted(d.glob("*.xml"))]
    files += sorted(folder.glob("*.xml"))
    out = []
    for f in files:
        out += entries_from_xml(f, prefix=f"{f.relative_to(folder).with_suffix('')}#")
    return out


def entries_from_json(path: Path) -> list[Record]:
    """Prefix-tuning's JSON layout: ``entries`` = ``[{"<i>": entry}]`` with i = 1, 2, ... in order."""
    try:
        data = json.loads(read_text(path))
        items = [(k, v) for item in data["entries"] for k, v in item.items()]
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise KpeftError(f"WebNLG file '{path}' is not prefix-tuning's JSON layout ({err!r})") from None
    out = []
    for key, e in items:
        lexes = [{"text": lex.get("lex", ""), "comment": lex.get("comment"), "lid": lex.get("xml_id")}
                 for lex in e.get("lexicalisations", [])]
        if not lexes:
            continue
        triples = [[t["subject"], t["property"], t["object"]] for t in e.get("modifiedtripleset", [])]
        out.append(_entry(key, e.get("xml_id", f"Id{key}"), e.get("category", ""), e.get("size", len(triples)),
                          triples, lexes))
    return out


def entry_from_hub(row: dict, index: int) -> Record:
    """A row of the hub's ``web_nlg`` (``webnlg_challenge_2017``) as an entry record."""
    mts = row["modified_triple_sets"]["mtriple_set"]
    triples = [_triple(t) for t in (mts[0] if mts else [])]
    lex = row["lex"]
    lexes = [{"text": text, "comment": comment or None, "lid": lid}
             for text, comment, lid in zip(lex["text"], lex["comment"], lex["lid"])]
    return _entry(str(index + 1), row.get("eid", f"Id{index + 1}"), row["category"], row["size"], triples, lexes)


def training_examples(entries: list[Record]) -> list[Record]:
    """One example per (entry, lexicalisation) kept: ``comment == "good"`` where a comment exists."""
    out = []
    for e in entries:
        for lex in e["lexes"]:
            if lex["comment"] not in (None, "", "good"):
                continue
            out.append({"id": f"{e['id']}/{lex['lid']}", "eid": e["eid"], "category": e["category"],
                        "subset": e["subset"], "triples": e["triples"], "target": lex["text"]})
    return out


def _hash_order(entry: Record) -> str:
    return hashlib.sha1(f"{entry['category']}|{entry['size']}|{entry['eid']}".encode()).hexdigest()


def stratified_pick(entries: list[Record], quota: float | int, stratum: Callable[[Record], Any]) -> set[str]:
    """The ids of a deterministic stratified sample of `entries` (a pure function of their
    category, size and eid). `quota` < 1 is a fraction, ≥ 1 a count; each stratum gets its
    proportional share (largest remainder, so shares sum to the count) and gives its entries in
    the order of ``sha1("category|size|eid")``."""
    groups: dict[Any, list[Record]] = {}
    for e in entries:
        groups.setdefault(stratum(e), []).append(e)
    total = float(quota) * len(entries) if float(quota) < 1 else min(int(quota), len(entries))
    exact = {k: total * len(v) / len(entries) for k, v in groups.items()}
    share = {k: int(x) for k, x in exact.items()}
    left = round(total) - sum(share.values())
    for k in sorted(exact, key=lambda k: (share[k] - exact[k], str(k)))[: max(left, 0)]:
        share[k] += 1
    return {e["id"] for k, v in groups.items() for e in sorted(v, key=_hash_order)[: share[k]]}


def select_entries(official: Callable[[str], list[Record]], split: str, options: Any) -> list[Record]:
    """`split`'s entries after two options (official order kept):

    * ``dev_into_train`` (fraction in (0, 1)): that share of every (category, size) stratum of
      dev moves to train (e.g. so that a 1–2-triple training set sees 3–7-triple inputs);
      validation keeps the rest;
    * ``test_subset`` (count): a stratified sample of the test set by (seen/unseen, size)."""
    moved, subset = options.get("dev_into_train"), options.get("test_subset")
    if moved and split in ("train", "validation"):
        if not 0 < float(moved) < 1:
            raise KpeftError(f"task.options.dev_into_train={moved} must be a fraction in (0, 1), e.g. 0.5")
        dev = official("validation")
        picked = stratified_pick(dev, float(moved), lambda e: (e["category"], e["size"]))
        if split == "train":
            return official("train") + [e for e in dev if e["id"] in picked]
        return [e for e in dev if e["id"] not in picked]
    if subset and split == "test":
        if int(subset) < 1:
            raise KpeftError(f"task.options.test_subset={subset} must be a number of entries (>= 1), or null")
        test = official("test")
        picked = stratified_pick(test, int(subset), lambda e: (e["subset"], e["size"]))
        return [e for e in test if e["id"] in picked]
    return official(split)


class WebNLG(NLGTask):
    """WebNLG 2017 challenge data, its GPT-2 encoding (:mod:`kpeft.tasks.nlg`) and official scorer."""

    special_key = "webnlg"

    layout = (
        "the WebNLG 2017 challenge files: train/<n>triples/*.xml, dev/<n>triples/*.xml and "
        f"{TEST_XML}, or prefix-tuning's train.json, dev.json, test.json"
    )
    hub_path, hub_name = "web_nlg", "webnlg_challenge_2017"
    hub_splits = {"train": "train", "validation": "dev", "test": "test"}

    def entries(self, split: str) -> list[Record]:
        """One record per entry (all lexicalisations), in official order, after the selection options
        (:func:`select_entries`: ``dev_into_train``, ``test_subset``)."""
        split = canonical_split(split)
        key = f"entries/{split}"
        if key not in self._records:
            self._records[key] = select_entries(self._official_entries, split, self.options)
        return self._records[key]

    def _official_entries(self, split: str) -> list[Record]:
        key = f"official/{split}"
        if key not in self._records:
            self._records[key] = self._file_entries(split) if self.cfg.data_dir else self._hub_entries(split)
        return self._records[key]

    def _file_entries(self, split: str) -> list[Record]:
        root = self.root()
        xml = root / TEST_XML if split == "test" else root / XML_DIRS[split]
        if xml.exists():
            return entries_from_xml(xml) if xml.is_file() else entries_from_xml_dir(xml)
        if (root / JSON_FILES[split]).is_file():
            return entries_from_json(root / JSON_FILES[split])
        want = TEST_XML if split == "test" else f"{XML_DIRS[split]}/<n>triples/*.xml"
        raise KpeftError(f"task 'webnlg': task.data_dir '{root}' has neither {want} nor {JSON_FILES[split]} "
                         f"for split '{split}'; it should hold {self.layout}")

    def _hub_entries(self, split: str) -> list[Record]:
        return [entry_from_hub(row, i) for i, row in enumerate(self.hub_split(split))]

    def file_records(self, split: str) -> list[Record]:
        return self.entries(split) if split == "test" else training_examples(self.entries(split))

    hub_records = file_records

    def read_predictions(self, path: str | Path) -> list[str]:
        """One output per line, or a run's ``generations/<split>.jsonl`` (its ``prediction`` fields)."""
        lines = super().read_predictions(path)
        if str(path).endswith(".jsonl"):
            try:
                return [json.loads(line)["prediction"] for line in lines if line.strip()]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise KpeftError(f"'{path}' is not a generations file (JSON lines with 'prediction'): {err!r}") from None
        return lines

    score_units = "entries"

    # ------------------------------------------------------------ GPT-2 encoding (docs/benchmarks.md)
    def target_of(self, record: Record) -> str:
        return record["target"]

    def segments(self, record: Record, target: str | None) -> list[Segment]:
        """``[<bos_webnlg>]``, then per triple ``[<subject>]+s``, ``[<property>]+p``, ``[<object>]+o``,
        then ``[<target_webnlg>] + target + [<eos_webnlg>]``; each segment typed by its special token."""
        bos, eos, subj, prop, obj, tgt = (self.sid(t) for t in self.special)
        segs: list[Segment] = [(bos, [bos])]
        for s, p, o in record["triples"]:
            segs += [(subj, [subj] + self.ids(s)), (prop, [prop] + self.ids(p)), (obj, [obj] + self.ids(o))]
        segs.append((tgt, [tgt] if target is None else [tgt] + self.ids(target) + [eos]))
        return segs

    def loss_records(self, split: str) -> list[Record]:
        split = canonical_split(split)
        return training_examples(self.entries(split)) if split == "test" else self.records(split)

    def generation_records(self, split: str) -> list[Record]:
        """One generation per entry (unique tripleset), scored against all its references."""
        return self.entries(split)

    def score_generations(self, records: list[Record], predictions: list[str]) -> tuple[dict[str, Any], list[dict]]:
        import sacrebleu

        refs = [e["references"] for e in records]
        scores = metric.evaluate(predictions, refs, [e["category"] for e in records],
                                 meteor=self.options.get("meteor", "jar"))
        rows = [{"id": e["id"], "eid": e["eid"], "subset": e["subset"], "prediction": p, "references": e["references"],
                 "sentence_bleu": sacrebleu.sentence_bleu(p, list(e["references"][:3])).score}
                for e, p in zip(records, predictions)]
        return flat_metrics(scores), rows
