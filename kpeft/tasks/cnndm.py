"""CNN/DailyMail summarisation (docs/benchmarks.md).

Under ``task.data_dir``, per split, either:

* line-aligned files ``{train,val,test}.source`` / ``.target`` (one article / summary per line;
  See et al.'s ``<t> … </t>`` sentence tags or ``<n>`` markers in a target mark its sentences); or
* Lin et al.'s JSON (the VGLM / Kernel-mix code's ``data/CNNDAILY/data.json``; file name
  ``task.options.json_file``): ``{"train": [{"src": article, "tgt": summary}, ...], "val": [...],
  "test": [...]}`` (``valid`` / ``validation`` / ``dev`` are accepted for ``val``; other keys of a
  pair, e.g. ``distillated_tgt``, are ignored; sentence markers in ``tgt`` as above); or
* the raw ``.story`` files (at any depth, e.g. ``cnn/stories/*.story``, ``dailymail/stories/``)
  with the official URL lists ``all_train.txt``, ``all_val.txt``, ``all_test.txt`` (in
  ``task.data_dir`` or ``url_lists/``; a story's file name is the SHA-1 of its URL). A story is
  read as the hub's ``cnn_dailymail`` 3.0.0 reads it: lines stripped, a " ." added to lines that
  end without punctuation, the article = its paragraphs joined by spaces, the highlights (the lines
  after ``@highlight``) joined by newlines; stories come in the hub's order (CNN, then Daily Mail,
  each sorted by file name).

Without ``task.data_dir``: the hub's ``cnn_dailymail`` 3.0.0 (``article``, ``highlights``, ``id``).

A record: ``{"id", "article", "highlights"}`` (highlights: one sentence per line where known).
``python -m kpeft.score task=cnndm predictions=FILE``: one summary per line (sentences may be
separated by ``<n>`` or a literal ``\\n`` for ROUGE-Lsum); ROUGE-1/2/L/Lsum F1 ×100 and the
Kernel-mix code's ``rouge2_vglm`` (:mod:`kpeft.metrics.rouge`).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

from kpeft.errors import KpeftError
from kpeft.metrics import rouge as metric
from kpeft.tasks.benchmark import Record, read_lines, read_text
from kpeft.tasks.nlg import NLGTask, Segment

FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
# The keys a split may have in Lin et al.'s data.json (their loader renames "val" to "valid").
JSON_KEYS = {"train": ("train",), "validation": ("val", "valid", "validation", "dev"), "test": ("test",)}
# Sentence-final tokens after which no period is added (the hub's cnn_dailymail reader).
END_TOKENS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")


def url_hash(url: str) -> str:
    return hashlib.sha1(url.strip().encode("utf-8")).hexdigest()


def _fix_missing_period(line: str) -> str:
    if "@highlight" in line or not line or line.endswith(END_TOKENS):
        return line
    return line + " ."


def read_story(path: Path) -> tuple[str, str]:
    """(article, highlights) of a ``.story`` file, as the hub's ``cnn_dailymail`` 3.0.0 builds them."""
    lines = [_fix_missing_period(line.strip()) for line in io.StringIO(read_text(path))]
    article, highlights, next_is_highlight = [], [], False
    for line in lines:
        if not line:
            continue
        if line.startswith("@highlight"):
            next_is_highlight = True
        elif next_is_highlight:
            highlights.append(line)
        else:
            article.append(line)
    return " ".join(article), "\n".join(highlights)


def _hub_order(path: Path, root: Path) -> tuple[int, str]:
    """The hub reader's order: CNN stories, then Daily Mail stories, each sorted by file name."""
    parts = path.relative_to(root).parts[:-1]
    return (1 if "dailymail" in parts or "dm" in parts else 0, path.name)


class CNNDM(NLGTask):
    """CNN/DailyMail data, its GPT-2 encoding (:mod:`kpeft.tasks.nlg`) and ROUGE."""

    special_key = "cnndm"

    layout = (
        "CNN/DM as line-aligned {train,val,test}.source / .target files, Lin et al.'s data.json "
        '({"train"|"val"|"test": [{"src", "tgt"}]}), or the .story files with the URL lists '
        "all_train.txt, all_val.txt, all_test.txt"
    )
    hub_path, hub_name = "cnn_dailymail", "3.0.0"

    def file_records(self, split: str) -> list[Record]:
        root = self.root()
        name = FILE_SPLIT[split]
        if (root / f"{name}.source").is_file() or (root / f"{name}.target").is_file():
            return self._aligned(root, name)
        if (root / self.options.get("json_file", "data.json")).is_file():
            return self._lin_json(root / self.options.get("json_file", "data.json"), split)
        return self._stories(root, name)

    def _lin_json(self, path: Path, split: str) -> list[Record]:
        """A split of Lin et al.'s ``data.json`` (see the module docstring)."""
        data = self._lin_data(path)
        key = next((k for k in JSON_KEYS[split] if k in data), None)
        if key is None:
            raise KpeftError(f"task 'cnndm': '{path}' has no split {' / '.join(JSON_KEYS[split])}; it has: "
                             f"{', '.join(map(str, data)) or 'nothing'}")
        out = []
        for i, pair in enumerate(data[key]):
            if not (isinstance(pair, dict) and isinstance(pair.get("src"), str) and isinstance(pair.get("tgt"), str)):
                raise KpeftError(f"task 'cnndm': item {i} of '{key}' in '{path}' is not a "
                                 '{"src": str, "tgt": str} pair')
            out.append({"id": str(pair.get("id", f"{key}-{i}")), "article": pair["src"],
                        "highlights": metric.sentences(pair["tgt"])})
        return out

    def _lin_data(self, path: Path) -> dict:
        """The parsed ``data.json`` (read once for all splits)."""
        if getattr(self, "_lin", None) is None:
            try:
                data = json.loads(read_text(path))
            except json.JSONDecodeError as err:
                raise KpeftError(f"task 'cnndm': '{path}' is not JSON ({err})") from None
            if not isinstance(data, dict):
                raise KpeftError(f"task 'cnndm': '{path}' should map split names to lists of "
                                 '{"src", "tgt"} pairs (Lin et al.\'s data.json)')
            self._lin = data
        return self._lin

    def _aligned(self, root: Path, name: str) -> list[Record]:
        root = self.root([f"{name}.source", f"{name}.target"])
        src, tgt = read_lines(root / f"{name}.source"), read_lines(root / f"{name}.target")
        if len(src) != len(tgt):
            raise KpeftError(f"task 'cnndm': {name}.source has {len(src)} lines but {name}.target {len(tgt)}")
        return [{"id": f"{name}-{i}", "article": s, "highlights": metric.sentences(t)} for i, (s, t) in enumerate(zip(src, tgt))]

    def _stories(self, root: Path, name: str) -> list[Record]:
        candidates = [root / f"all_{name}.txt", root / "url_lists" / f"all_{name}.txt", root / f"url_lists_all_{name}.txt"]
        url_list = next((c for c in candidates if c.is_file()), None)
        if url_list is None:
            raise KpeftError(f"task 'cnndm': task.data_dir '{root}' has neither {name}.source/{name}.target nor "
                             f"the URL list all_{name}.txt; it should hold {self.layout}")
        stories = {p.stem: p for p in root.rglob("*.story")}
        hashes = {url_hash(u) for u in read_lines(url_list) if u.strip()}
        missing = sorted(hashes - stories.keys())
        if missing:
            raise KpeftError(f"task 'cnndm': {len(missing)} of the {len(hashes)} stories in {url_list.name} are "
                             f"not under '{root}' (first: {missing[0]}.story)")
        out = []
        for h in sorted(hashes, key=lambda h: _hub_order(stories[h], root)):
            article, highlights = read_story(stories[h])
            out.append({"id": h, "article": article, "highlights": highlights})
        return out

    def hub_records(self, split: str) -> list[Record]:
        return [{"id": row.get("id", f"{split}-{i}"), "article": row["article"], "highlights": row["highlights"]}
                for i, row in enumerate(self.hub_split(split))]

    score_units = "examples"

    def scored_records(self, split: str) -> list[Record]:
        """Every example of the split (a predictions file of the official test set has one line each)."""
        return self.records(split)

    # ------------------------------------------------------------ GPT-2 encoding (docs/benchmarks.md)
    def target_of(self, record: Record) -> str:
        return " ".join(record["highlights"].split("\n"))

    def segments(self, record: Record, target: str | None) -> list[Segment] | None:
        """``[<bos_sm>]``, ``[<source_sm>] + src[:400]``, ``[<target_sm>] + tgt[:130] + [<eos_sm>]``;
        None (dropped) when the source or the target has fewer than 2 tokens."""
        bos, eos, source, tgt_marker = (self.sid(t) for t in self.special)
        src = self.ids(record["article"])[: int(self.options.get("max_source_tokens", 400))]
        tgt = self.ids(self.target_of(record))[: int(self.options.get("max_target_tokens", 130))]
        if len(src) < 2 or len(tgt) < 2:
            return None
        final = [tgt_marker] if target is None else [tgt_marker] + tgt + [eos]
        return [(bos, [bos]), (source, [source] + src), (tgt_marker, final)]

    def generation_records(self, split: str) -> list[Record]:
        return [r for r in self.records(split) if self.prompt(r) is not None]

    def score_generations(self, records: list[Record], predictions: list[str]) -> tuple[dict[str, Any], list[dict]]:
        from rouge_score import rouge_scorer

        refs = [metric.sentences(r["highlights"]) for r in records]
        preds = [metric.sentences(p) for p in predictions]
        out = metric.rouge(preds, refs)
        flat_p, flat_r = [" ".join(p.split("\n")) for p in preds], [" ".join(r.split("\n")) for r in refs]
        out["rouge2_vglm"] = metric.rouge2_vglm(flat_p, flat_r)
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        rows = []
        for r, p, ref, fp, fr in zip(records, predictions, refs, flat_p, flat_r):
            sc = scorer.score(ref, metric.sentences(p))
            rows.append({"id": r["id"], "prediction": p, **{k: 100.0 * v.fmeasure for k, v in sc.items()},
                         "rouge2_vglm": 100.0 * metric.rouge_n_vglm(fp, fr, 2)})
        return out, rows
