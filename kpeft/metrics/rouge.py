"""ROUGE for CNN/DailyMail (docs/benchmarks.md).

* :func:`rouge` — ROUGE-1/2/L/Lsum F1 ×100 from Google's ``rouge-score`` with Porter stemming
  (``use_stemmer=True``), averaged over examples. ROUGE-Lsum treats ``"\\n"`` as the sentence
  boundary (summary-level union LCS), so give multi-sentence texts one sentence per line
  (:func:`sentences` turns the usual markers into newlines). ROUGE-2 is the headline number.
  ``rouge-score`` agrees with the field's ROUGE-1.5.5 within about 0.25 ROUGE-2 points at system
  level on CNN/DM; it is not ROUGE-1.5.5 itself.
* :func:`rouge2_vglm` — the Kernel-mix / VGLM code's ROUGE-2 (``nlg/util/eval_metrics.py``): per
  example, the *sets* of word bigrams of the two texts split on single spaces, F1 =
  2PR/(P+R+1e-8), averaged with ``numpy.mean``; ×100. Only for comparing with that code's
  absolute numbers (~15 on CNN/DM); it is not ROUGE.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kpeft.errors import KpeftError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_T_TAG = re.compile(r"<t>(.*?)</t>", re.S)


def sentences(text: str) -> str:
    """One sentence per line: See et al.'s ``<t> … </t>`` tags, the ``<n>`` marker, or a literal
    two-character ``\\n`` become line breaks; text without markers is left as it is."""
    tagged = _T_TAG.findall(text)
    if tagged:
        return "\n".join(" ".join(t.split()) for t in tagged)
    text = text.replace("\\n", "\n").replace("<n>", "\n")
    return "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip())


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise KpeftError(f"{len(predictions)} predictions for {len(references)} references: one per example")
    if not predictions:
        raise KpeftError("ROUGE of an empty corpus")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 ×100 (``rouge-score``, Porter stemmer; Lsum over ``\\n`` sentences)."""
    import numpy as np
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    f = {k: [] for k in ROUGE_KEYS}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in ROUGE_KEYS:
            f[k].append(scores[k].fmeasure)
    return {k: 100.0 * float(np.mean(v)) for k, v in f.items()}


def _ngram_set(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def rouge_n_vglm(prediction: str, reference: str, n: int = 2) -> float:
    """The VGLM code's per-example ROUGE-N F1 (a fraction): n-gram *sets* of ``text.split(" ")``."""
    pred = _ngram_set(prediction.split(" "), n)
    ref = _ngram_set(reference.split(" "), n)
    overlap = len(pred & ref)
    precision = overlap / len(pred) if pred else 0.0
    recall = overlap / len(ref) if ref else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge2_vglm(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The Kernel-mix code's ROUGE-2 (set-based bigram F1 averaged over examples), ×100."""
    import numpy as np

    _check(predictions, references)
    return 100.0 * float(np.mean([rouge_n_vglm(p, r, 2) for p, r in zip(predictions, references)]))
