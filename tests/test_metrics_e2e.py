"""E2E NLG Challenge metrics (Dušek et al. 2020; docs/benchmarks.md): mteval's tokenisation, BLEU and NIST by hand, ROUGE-L and
CIDEr by hand, and whole test sets against what the official scorer (``e2e-metrics``'
``measure_scores.py`` with ``mteval-v13a-sig.pl``) printed for them. The official numbers below were
produced by running that scorer on the same inputs (its BLEU/NIST printf widened to 12 decimals).

``$KPEFT_E2E_CHALLENGE`` may name a folder with the challenge's primary system outputs
(``system_outputs/primary/<team>.tsv`` of github.com/tuetschek/e2e-eval, not in the repository)
to re-check the TGen baseline's published scores."""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import pytest
from helpers import FIXTURES

from kpeft.errors import KpeftError
from kpeft.metrics import e2e as E
from kpeft.tasks.e2e import group_mrs, read_csv

DATA = FIXTURES / "e2e"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` (PTB tokenizer, METEOR)")
pytest.importorskip("pycocoevalcap")
CHALLENGE = Path(os.environ.get("KPEFT_E2E_CHALLENGE", "/nonexistent"))


def mrs(name: str) -> list[dict]:
    return group_mrs(read_csv(DATA / name))


def template(slots: list[list[str]]) -> str:
    """A deterministic template system (a realistic, imperfect output for whole-corpus checks)."""
    s = dict(slots)
    text = f"{s.pop('name')} is a {s.pop('eatType', 'restaurant')}"
    if "food" in s:
        text += f" serving {s.pop('food')} food"
    if "area" in s:
        text += f" in the {s.pop('area')}"
    if "near" in s:
        text += f" near {s.pop('near')}"
    text += "."
    if "priceRange" in s:
        text += f" Its price range is {s.pop('priceRange')}."
    if "customer rating" in s:
        text += f" It has a {s.pop('customer rating')} customer rating."
    if "familyFriendly" in s:
        text += " It is family friendly." if s.pop("familyFriendly") == "yes" else " It is not family friendly."
    return text


# Hand-made corpus with the tokeniser's corner cases (entities, £, digits around . , -, the token
# "0", a multi-reference MR, an empty output, a "|||" in an output, non-ASCII capitals).
ADVERSARIAL_REFS = [
    ["The Eagle is a coffee shop near Burger King, rated 5 out of 5.", "Near Burger King is The Eagle: a 5-star coffee shop!",
     "The Eagle (coffee shop) is 3.5 miles away."],
    ["Prices are £20-25 at Café Sicilia; it's kid-friendly.", "At 0 0 stars, 0 people go to Café Sicilia."],
    ["It costs 20-25 pounds, i.e. moderate &amp; cheap &lt;ok&gt;.", 'U.S. diners say "great" food/drink #1 @home.'],
    ["Only one reference here, with ÉCOLE and Straße."],
    ["a b c d e f g h", "a b c", "x y"],
]
ADVERSARIAL_HYPS = [
    "The Eagle is a coffee shop near Burger King, rated 5 out of 5 .",
    "0 0 stars at Café Sicilia, prices £20-25;it's kid-friendly",
    'It costs 20-25 pounds , i.e. moderate &amp; cheap <ok> "great" food/drink',
    "",
    "  a b  c d ||| e   ",
]
ADVERSARIAL_OFFICIAL = {"bleu": 0.739963219003, "nist": 6.67906925655, "meteor": 0.4874614146085656,
                        "rouge_l": 0.61688995215311, "cider": 2.6369351987367784}


def test_mteval_tokenisation_by_hand():
    """mteval-v13a: ASCII lower-casing only; punctuation split except ' , - . ; . and , kept between
    digits; a dash after a digit split; the SGML entities decoded (outputs checked with the Perl sub)."""
    assert E.mteval_words("Prices are £20-25 at Café Sicilia; it's kid-friendly.") == [
        "prices", "are", "£20", "-", "25", "at", "café", "sicilia", ";", "it's", "kid-friendly", "."]
    assert " ".join(E.mteval_words('3.5 stars, U.S. 1,000 and 5-star (ÉCOLE) "x"')) == \
        '3.5 stars , u . s . 1,000 and 5 - star ( École ) " x "'
    assert " ".join(E.mteval_words("&amp; &lt;b&gt; a.,b 0.5-1 #1@home/x_y")) == "& < b > a . , b 0.5 - 1 # 1 @ home / x _ y"
    assert E.mteval_words("  \t ") == [] and E.mteval_words("a\u00a0b") == ["a", "b"]
    assert E.fix_encoding("Â£20 at CafÃ© and Ł5, cafã©") == "£20 at Café and £5, café"


def test_bleu_by_hand():
    # all n-gram precisions 1; the only reference has 6 words: BP = exp(1 - 6/4)
    bleu, _, _ = E.bleu_nist(["a b c d"], [["a b c d e f"]])
    assert bleu == pytest.approx(math.exp(-0.5), abs=1e-12)
    # closest reference length: |4-6| = |4-2| -> the shorter one (2), so no brevity penalty
    assert E.bleu_nist(["a b c d"], [["a b c d e f", "a b"]])[0] == pytest.approx(1.0, abs=1e-12)
    # clipping against the per-n-gram maximum over the references and mteval's smoothing:
    # p1 = 3/4 (a clipped at 2), p2 = 2/3, no 3-gram match -> 1/(2·2), no 4-gram match -> 1/(4·1); BP = 1
    assert E.bleu_nist(["a a a b"], [["a b a", "a a c"]])[0] == pytest.approx((3 / 4 * 2 / 3 * 1 / 4 * 1 / 4) ** 0.25, abs=1e-12)
    # corpus-level: statistics are summed before the precisions are taken
    bleu, _, segs = E.bleu_nist(["a b", "c d x"], [["a b"], ["c d"]])
    assert [s.matches[:2] for s in segs] == [[2, 1], [2, 1]] and [s.ref_length for s in segs] == [2, 2]
    # p1 = 4/5, p2 = 2/3, p3: 0 of 1 -> 1/2, p4: no 4-gram in the output at all -> counts as 1; BP = 1
    assert bleu == pytest.approx((4 / 5 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-12)


def test_nist_by_hand():
    """info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all references; Σ_n matched info /
    output n-grams; length penalty against total reference words / average references per MR."""
    # refs "a b", "a c": 4 words; info(a) = log2(4/2) = 1, info(b) = 2, info("a b") = log2(2/1) = 1
    _, nist, _ = E.bleu_nist(["a b"], [["a b", "a c"]])
    assert nist == pytest.approx((1 + 2) / 2 + 1 / 1, abs=1e-12)  # L_ref = 4 / 2 = 2 = L_sys
    # a 1-word output: (1/1) · exp(-β log²(1/2)), β = ln 2 / ln² 1.5
    beta = math.log(2) / math.log(1.5) ** 2
    assert E.bleu_nist(["a"], [["a b", "a c"]])[1] == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)
    assert E.nist_length_penalty(1 / 1.5) == pytest.approx(0.5, abs=1e-12)
    # E2E's length: 2 references for the first MR, 1 for the second -> 1.5 on average, L_ref = 6 / 1.5 = 4
    # words a:2 b c d e (6): info(a) = log2 3, info(b) = info(d) = log2 6, info("a b") = 1, L_sys = 3
    _, nist, _ = E.bleu_nist(["a b", "d"], [["a b", "a c"], ["d e"]])
    expected = ((math.log2(3) + 2 * math.log2(6)) / 3 + 1 / 1) * math.exp(-beta * math.log(3 / 4) ** 2)
    assert nist == pytest.approx(expected, abs=1e-12)


def test_nist_reads_the_bigram_prefix_0_as_false_like_the_perl_script():
    # refs "0 a", "b c" (4 words): info("0 a") = log2(4/1) = 2 (the script's `"0" ? … : …`),
    # not log2(count("0") / 1) = 0; output "0 a": (2 + 2) / 2 + 2 / 1 = 4
    assert E.bleu_nist(["0 a"], [["0 a", "b c"]])[1] == pytest.approx(4.0, abs=1e-12)
    assert E.bleu_nist(["00 a"], [["00 a", "b c"]])[1] == pytest.approx(2.0, abs=1e-12)


@needs_java
def test_ptb_tokenizer_drops_punctuation_and_lowercases():
    assert E.ptb_tokenize(['Café Sicilia costs £20-25. It is "family-friendly"!', "", "A\u2028B"]) == [
        "café sicilia costs # 20-25 it is family-friendly", "", "a b"]  # PTB writes £ as #


@needs_java
def test_rouge_l_and_cider_by_hand():
    # ROUGE-L: best precision and best recall over the references separately, β = 1.2
    refs = [["the cat sat on the mat", "cat sat"], ["a c e"], ["cat"]]
    f2 = (1 + 1.2**2) * (1 / 2) * (2 / 3) / (2 / 3 + 1.2**2 * (1 / 2))  # LCS "a c": P = 2/4, R = 2/3
    scores = E.evaluate(["The cat sat.", "a b c d", "dog"], refs, meteor="off")
    assert scores["rouge_l"] == pytest.approx((1.0 + f2 + 0.0) / 3, abs=1e-12)
    # CIDEr-D: every n-gram has document frequency ≤ 1, so idf is one constant and the tf-idf cosines
    # are plain count cosines; "length" is the number of bigrams: δ = 2 - 1 for "a b a" vs "a b"
    refs = [["a b"], ["d"], ["e f", "g"]]
    first = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2) + 0 + 0) / 4
    third = 10 * ((1 + 1 + 0 + 0) / 4 + 0) / 2  # "e f" matches its first reference only
    assert E.evaluate(["a b a", "c", "e f"], refs, meteor="off")["cider"] == pytest.approx((first + 0 + third) / 3, abs=1e-12)


def test_bad_inputs():
    with pytest.raises(KpeftError, match="1 outputs for 2 E2E MRs"):
        E.evaluate(["x"], [["a"], ["b"]])
    with pytest.raises(KpeftError, match="unknown METEOR mode 'exact'"):
        E.evaluate(["x"], [["a"]], meteor="exact")
    with pytest.raises(KpeftError, match="has no reference"):
        E.evaluate(["x"], [[]], coco=False)


@needs_java
def test_adversarial_corpus_equals_the_official_scorer_without_meteor():
    scores = E.evaluate(ADVERSARIAL_HYPS, ADVERSARIAL_REFS, meteor="off")
    assert set(scores) == {"bleu", "nist", "rouge_l", "cider"}
    for name, value in scores.items():
        assert value == pytest.approx(ADVERSARIAL_OFFICIAL[name], abs=1e-11), name


@pytest.mark.slow  # METEOR's JVM loads its paraphrase table: ~25 s
@needs_java
def test_adversarial_corpus_equals_the_official_scorer_with_meteor():
    scores = E.evaluate(ADVERSARIAL_HYPS, ADVERSARIAL_REFS)
    assert set(scores) == set(ADVERSARIAL_OFFICIAL)
    for name, value in scores.items():
        assert value == pytest.approx(ADVERSARIAL_OFFICIAL[name], abs=1e-11), name
    assert E.evaluate(ADVERSARIAL_HYPS, ADVERSARIAL_REFS, meteor="approx", coco=True)["meteor_approx"] > 0


def test_official_test_and_dev_sets_bleu_nist():
    test = mrs("testset_w_refs.csv")
    refs = [m["references"] for m in test]
    shifted = [test[i - 1]["references"][0] for i in range(len(test))]  # the previous MR's first reference
    bleu, nist, _ = E.bleu_nist(shifted, refs)
    assert (bleu, nist) == (pytest.approx(0.358008536003, abs=1e-11), pytest.approx(5.921019159442, abs=1e-11))
    bleu, nist, _ = E.bleu_nist([r[0] for r in refs], refs)
    assert (round(bleu, 4), round(nist, 4)) == (1.0, 14.2365)


@needs_java
def test_template_system_on_the_dev_set_without_meteor():
    dev = mrs("devset.csv")
    scores = E.evaluate([template(m["slots"]) for m in dev], [m["references"] for m in dev], meteor="off")
    official = {"bleu": 0.589602684777, "nist": 7.591304244999, "rouge_l": 0.6619381391219006, "cider": 2.1318161089290784}
    for name, value in official.items():
        assert scores[name] == pytest.approx(value, abs=1e-11), name


@pytest.mark.slow  # METEOR over 547 MRs: ~40 s
@needs_java
def test_template_system_on_the_dev_set_with_meteor():
    dev = mrs("devset.csv")
    scores, rows = E.score_corpus([template(m["slots"]) for m in dev], [m["references"] for m in dev])
    assert scores["meteor"] == pytest.approx(0.4429840756823111, abs=1e-12)
    assert len(rows) == 547 and set(rows[0]) == {"bleu", "rouge_l", "cider"}
    assert sum(r["cider"] for r in rows) / 547 == pytest.approx(scores["cider"], abs=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not (CHALLENGE / "tgen.tsv").is_file(), reason="set KPEFT_E2E_CHALLENGE to the challenge's primary outputs")
@needs_java
def test_tgen_baseline_scores_as_published():
    with open(CHALLENGE / "tgen.tsv", encoding="utf-8", newline="") as f:
        outputs = dict(list(csv.reader(f, delimiter="\t"))[1:])
    test = mrs("testset_w_refs.csv")
    scores = E.evaluate([outputs[m["mr"]] for m in test], [m["references"] for m in test])
    assert {k: f"{v:.4f}" for k, v in scores.items()} == {
        "bleu": "0.6593", "nist": "8.6094", "meteor": "0.4483", "rouge_l": "0.6850", "cider": "2.2338"}
