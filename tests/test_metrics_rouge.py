"""ROUGE (rouge-score) and the Kernel-mix code's set-based rouge2_vglm, by hand."""

from __future__ import annotations

import pytest

from kpeft.metrics import rouge as R

PRED = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_rouge_by_hand():
    out = R.rouge([PRED], [REF])
    # ROUGE-1: multiset overlap {the x2, cat, on, mat} = 5 of 6 on both sides -> F = 5/6.
    assert out["rouge1"] == pytest.approx(100 * 5 / 6)
    # ROUGE-2: bigrams overlap {the cat, on the, the mat} = 3 of 5 -> F = 3/5.
    assert out["rouge2"] == pytest.approx(60.0)
    # ROUGE-L: LCS "the cat on the mat" = 5 -> 5/6; one sentence, so Lsum = L.
    assert out["rougeL"] == pytest.approx(100 * 5 / 6) and out["rougeLsum"] == out["rougeL"]


def test_stemming_and_lsum_sentences():
    assert R.rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)  # Porter stems
    # Lsum unions the LCS of each reference sentence over the prediction sentences: the
    # sentence order no longer matters, while plain L does.
    swapped = R.rouge(["b c d\na x y"], ["a x y\nb c d"])
    assert swapped["rougeLsum"] == pytest.approx(100.0) and swapped["rougeL"] < 100.0


def test_sentence_markers():
    assert R.sentences("<t> one . </t> <t> two . </t>") == "one .\ntwo ."
    assert R.sentences("one . <n> two .") == "one .\ntwo ."
    assert R.sentences("one .\\ntwo .") == "one .\ntwo ."
    assert R.sentences("just one line .") == "just one line ."


def test_rouge2_vglm_is_set_based_on_single_spaces():
    # bigram SETS: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat is, is on,
    # on the, the mat}: 3 shared, P = R = 3/5, F1 = 2·0.36 / (1.2 + 1e-8).
    assert R.rouge_n_vglm(PRED, REF, 2) == pytest.approx(2 * 0.36 / (1.2 + 1e-8), rel=1e-12)
    # Repeated bigrams count once: "a b a b" has the set {a b, b a}.
    assert R.rouge_n_vglm("a b a b", "a b", 2) == pytest.approx(2 * (0.5 * 1.0) / (1.5 + 1e-8))
    assert R.rouge2_vglm([PRED, "x"], [REF, "y"]) == pytest.approx(100 * (0.6 + 0.0) / 2, rel=1e-7)
