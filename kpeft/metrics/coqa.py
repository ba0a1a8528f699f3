"""CoQA's official evaluation (``evaluate-v1.0``; docs/benchmarks.md), reproduced exactly.

* Gold answers of turn i: ``answers[i].input_text``, then ``additional_answers[k][i].input_text``
  for each key k in file order (``span_text`` is ignored).
* Normalisation: lower-case; delete every ``string.punctuation`` character ("U.S.A." → "usa");
  replace the words a / an / the by a space; split on whitespace and re-join.
* EM = equality after normalisation; F1 = token F1 with multiset overlap (if either side has no
  token: 1 when both have none, else 0).
* n > 1 gold answers: for each i, the best score against the other n − 1 answers, averaged over
  the n choices (so matching one annotator exactly can score below 1); one gold: plain comparison.
* A gold turn without a prediction scores 0, with the official warning on stderr
  (``Missing prediction for <id> and turn_id: <turn>``) and a count (``missing``); predictions for unknown turns are ignored; a later
  duplicate prediction overwrites an earlier one.
* Aggregation: per source domain, in-domain (children_stories, literature, mid-high_school, news,
  wikipedia), out-of-domain (reddit, science), **overall = mean over all turns**; every value is
  ``round(total / turns * 100, 1)``, summed in the official order so the floats are identical.
"""

from __future__ import annotations

import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kpeft.errors import KpeftError

IN_DOMAIN = ("mctest", "gutenberg", "race", "cnn", "wikipedia")
OUT_DOMAIN = ("reddit", "science")
DOMAIN_NAMES = {
    "mctest": "children_stories", "gutenberg": "literature", "race": "mid-high_school", "cnn": "news",
    "wikipedia": "wikipedia", "science": "science", "reddit": "reddit",
}

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)

Key = tuple[str, int]  # (story id, turn id)


def normalize_answer(text: str) -> str:
    """Lower, drop ASCII punctuation, replace articles by a space, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = answer_tokens(gold), answer_tokens(pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)  # no-answer on either side: 1 iff both
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def turn_score(golds: Sequence[str], pred: str) -> tuple[float, float]:
    """(EM, F1) of one turn: leave-one-out over the gold answers when there are several."""
    em_sum = f1_sum = 0.0
    if len(golds) > 1:
        for i in range(len(golds)):
            others = list(golds[:i]) + list(golds[i + 1 :])
            em_sum += max(exact_match(a, pred) for a in others)
            f1_sum += max(f1(a, pred) for a in others)
    else:
        em_sum += max(exact_match(a, pred) for a in golds)
        f1_sum += max(f1(a, pred) for a in golds)
    n = max(1, len(golds))
    return em_sum / n, f1_sum / n


def gold_from_json(data: Mapping[str, Any], require_additional: bool = True) -> tuple[dict[Key, list[str]], dict[str, str]]:
    """``{(story id, turn id): [gold answers]}`` and ``{story id: source}`` from an official CoQA
    JSON (``{"version", "data": [story, ...]}``). The official scorer requires
    ``additional_answers`` (the dev file has them); ``require_additional=False`` accepts the train
    file's single answers."""
    golds: dict[Key, list[str]] = {}
    sources: dict[str, str] = {}
    for story in data["data"]:
        story_id, source = story["id"], story["source"]
        if source not in DOMAIN_NAMES:
            raise KpeftError(f"CoQA story {story_id} has unknown source '{source}'; known: {', '.join(DOMAIN_NAMES)}")
        sources[story_id] = source
        if "additional_answers" not in story and require_additional:
            raise KpeftError(f"CoQA story {story_id} has no additional_answers (the official dev file has them)")
        annotators = [story["answers"], *story.get("additional_answers", {}).values()]
        for i, question in enumerate(story["questions"]):
            golds[(story_id, int(question["turn_id"]))] = [answers[i]["input_text"] for answers in annotators]
    return golds, sources


def predictions_from_json(preds: Iterable[Mapping[str, Any]]) -> dict[Key, str]:
    """The official prediction list ``[{"id", "turn_id", "answer"}, ...]``; later duplicates win."""
    out: dict[Key, str] = {}
    try:
        for p in preds:
            out[(p["id"], int(p["turn_id"]))] = p["answer"]
    except (KeyError, TypeError, ValueError) as err:
        raise KpeftError(f'CoQA predictions must be a JSON list of {{"id", "turn_id", "answer"}} objects ({err!r})') from None
    return out


def _pct(total: float, count: int) -> float:
    return round(total / max(1, count) * 100, 1)  # the official expression, in its order


def evaluate(golds: Mapping[Key, Sequence[str]], sources: Mapping[str, str], predictions: Mapping[Key, str]) -> dict[str, Any]:
    """``{"em", "f1", "turns", "missing", "in_domain": {...}, "out_domain": {...}, "domains": {...}}``
    with the official rounding; ``em``/``f1`` are the official ``overall``; ``missing`` counts the
    gold turns without a prediction (scored 0, each warned about on stderr)."""
    em_tot = {s: 0.0 for s in DOMAIN_NAMES}
    f1_tot = {s: 0.0 for s in DOMAIN_NAMES}
    turns = dict.fromkeys(DOMAIN_NAMES, 0)
    missing = 0
    for key, gold in golds.items():
        source = sources[key[0]]
        if key in predictions:
            em, f = turn_score(gold, predictions[key])
            em_tot[source] += em
            f1_tot[source] += f
        else:
            print(f"Missing prediction for {key[0]} and turn_id: {key[1]}", file=sys.stderr)
            missing += 1
        turns[source] += 1

    domains: dict[str, dict[str, float]] = {}
    groups = {"in_domain": [0.0, 0.0, 0], "out_domain": [0.0, 0.0, 0]}
    for source in IN_DOMAIN + OUT_DOMAIN:
        domains[DOMAIN_NAMES[source]] = {
            "em": _pct(em_tot[source], turns[source]), "f1": _pct(f1_tot[source], turns[source]), "turns": turns[source]
        }
        group = groups["in_domain" if source in IN_DOMAIN else "out_domain"]
        group[0] += em_tot[source]
        group[1] += f1_tot[source]
        group[2] += turns[source]
    out: dict[str, Any] = {}
    for name, (em_sum, f1_sum, n) in groups.items():
        out[name] = {"em": _pct(em_sum, n), "f1": _pct(f1_sum, n), "turns": n}
    (in_em, in_f1, in_n), (out_em, out_f1, out_n) = groups["in_domain"], groups["out_domain"]
    n = in_n + out_n
    return {"em": _pct(in_em + out_em, n), "f1": _pct(in_f1 + out_f1, n), "turns": n, "missing": missing,
            **out, "domains": domains}
