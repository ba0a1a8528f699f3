"""WebNLG 2017 challenge metrics: the official preprocessing, BLEU / TER by hand, and the challenge's
own outputs scored again when a folder with them is given: ``$KPEFT_WEBNLG_CHALLENGE`` holding
``<team>.txt.gz`` (a team's 1,862 preprocessed test outputs, e.g. ``teams/<team>_all-cat.txt`` of
the challenge's evaluation scripts) and ``official_scores.json`` (what multi-bleu.perl, METEOR 1.5
and tercom printed for them). Those files are not part of the repository."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import pytest
from helpers import FIXTURES

from kpeft.errors import KpeftError
from kpeft.metrics import webnlg as W
from kpeft.metrics.ter import multi_reference_ter, shifted
from kpeft.metrics.ter import ter_edits as T_edits

CHALLENGE = Path(os.environ.get("KPEFT_WEBNLG_CHALLENGE", "/nonexistent"))
needs_challenge = pytest.mark.skipif(
    not (CHALLENGE / "official_scores.json").is_file(),
    reason="set KPEFT_WEBNLG_CHALLENGE to a folder with the 2017 challenge submissions and their official scores",
)
TEST_XML = FIXTURES / "webnlg2017" / "test" / "testdata_with_lex.xml"


def test_hypothesis_and_reference_preprocessing_follow_the_challenge():
    assert W.preprocess_hypothesis("  Abilene, Texas is served by the Abilene regional airport.\n") == (
        "abilene , texas is served by the abilene regional airport ."
    )
    # unidecode folds accents and dashes; \W splits apostrophes and quotes; whitespace collapses.
    assert W.preprocess_hypothesis("Adolfo Suárez Madrid–Barajas  Airport's") == "adolfo suarez madrid - barajas airport ' s"
    # References are split BEFORE unidecode: "½" is a word character, so it survives the split and
    # only then becomes " 1/2" — the reference keeps "1/2" as one token (and the double space).
    assert W.preprocess_reference("Runway ½ of Madrid–Barajas") == "runway  1/2 of madrid - barajas"
    assert W.preprocess_hypothesis("Runway ½ of Madrid–Barajas") == "runway 1 / 2 of madrid - barajas"


def test_subsets():
    assert W.subset_of("Politician") == "unseen" and W.subset_of("Airport") == "seen"
    assert len(W.SEEN_CATEGORIES) == 10 and len(W.UNSEEN_CATEGORIES) == 5
    assert not W.SEEN_CATEGORIES & W.UNSEEN_CATEGORIES


def test_reference_triples_pad_with_empty_strings():
    assert W.reference_triples([["A b."], ["x", "y", "z", "w"]]) == [["a b .", "", ""], ["x", "y", "z"]]


def test_bleu_by_hand_and_the_empty_reference_in_the_length_choice():
    # hyp "a b c d" vs refs ("a b c d e f", "", ""): all 4 n-gram precisions are 1. The closest
    # reference length to 4 is 6 (|4-6| = 2 < |4-0| = 4), so BP = exp(1 - 6/4) and BLEU = 100·e^-0.5.
    import math

    assert W.bleu(["a b c d"], [["a b c d e f", "", ""]]) == pytest.approx(100 * math.exp(-0.5), abs=1e-9)
    # hyp "a b" vs ("a b c d e", "", ""): |2-0| = 2 < |2-5| = 3, so the EMPTY reference is the
    # closest: BP = 1 — but there is no 3-gram or 4-gram at all, so BLEU = 0 (no smoothing, as
    # multi-bleu.perl). With a 4-word hyp whose closest length is 0: BP = 1 (hyp longer than ref).
    assert W.bleu(["a b"], [["a b c d e", "", ""]]) == 0.0
    assert W.bleu(["a b c d"], [["a b c d x y z w q", "", ""]]) == pytest.approx(100.0)  # |4-0| < |4-9|
    # Dropping the empty reference changes the brevity penalty: 4 vs 9 -> BP = exp(1 - 9/4).
    assert W.bleu(["a b c d"], [["a b c d x y z w q", "a b c d x y z w q", "a b c d x y z w q"]]) == pytest.approx(
        100 * math.exp(1 - 9 / 4)
    )


def test_ter_by_hand_uses_only_non_empty_references():
    # "a b c d" vs "a b x d": one substitution over 4 words. The empty padding references are
    # not counted in the average reference length (4, not 4/3).
    assert W.ter(["a b c d"], [["a b x d", "", ""]]) == pytest.approx(0.25)
    # Two references: the fewest edits (1, against "a b c e") over the AVERAGE length (4 + 2) / 2.
    assert W.ter(["a b c d"], [["a b c e", "a b", ""]]) == pytest.approx(1 / 3)
    # A shift costs one edit: "b c a" vs "a b c" (move "a").
    assert W.ter(["b c a"], [["a b c", "", ""]]) == pytest.approx(1 / 3)
    # Corpus TER sums edits and lengths over segments: (1 + 0) / (4 + 2).
    assert W.ter(["a b c d", "x y"], [["a b x d", "", ""], ["x y", "", ""]]) == pytest.approx(1 / 6)


def test_tercom_shift_reads_a_target_inside_the_span_as_tercom_does():
    words = "w0 w1 w2 w3 w4 w5".split()
    assert shifted(words, 3, 4, -1) == "w3 w4 w0 w1 w2 w5".split()  # to the front
    assert shifted(words, 3, 4, 0) == "w0 w3 w4 w1 w2 w5".split()  # after w0
    assert shifted(words, 1, 2, 4) == "w0 w3 w4 w1 w2 w5".split()  # after w4
    # newloc inside [start, end]: tercom moves the span right by newloc - start words
    assert shifted(words, 1, 3, 2) == "w0 w4 w1 w2 w3 w5".split()
    assert shifted(words, 1, 3, 1) == words


def _levenshtein(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_ter_follows_tercom_where_sacrebleus_port_does_not(monkeypatch):
    """Segments whose tercom 0.7.25 edit counts (run with the jar: 4 and 24) differ from
    sacrebleu's port of it (5 and 22)."""
    from sacrebleu.metrics.lib_ter import translation_edit_rate

    from kpeft.metrics import ter as T

    # 1. tercom's first shift moves "b e" after the first "a", a target inside the span (6 -> 4
    # edits), then the last "a" to the front (-> 2): 2 shifts + 2 deletions. sacrebleu reads that
    # target one word further right and needs three shifts.
    hyp, ref = "b e a c a".split(), "a b a d b e c".split()
    assert T.ter_edits(hyp, ref) == 4 and translation_edit_rate(hyp, ref)[0] == 5
    # 2. The beam: 10 words "w" against 22 "q" then 10 "w". The optimum deletes the q's (22
    # edits, what sacrebleu's diagonal band finds), but that path costs more than the best
    # diagonal cost of the first column + 20, and tercom prunes it: 24.
    hyp, ref = ["w"] * 10, ["q"] * 22 + ["w"] * 10
    assert _levenshtein(hyp, ref) == 22 and translation_edit_rate(hyp, ref)[0] == 22
    assert T.ter_edits(hyp, ref) == 24
    monkeypatch.setattr(T, "BEAM_WIDTH", 100)  # a beam that prunes nothing gives the optimum back
    assert T.ter_edits(hyp, ref) == 22


def test_tercom_multi_reference_statistics():
    # fewest edits over the references (1, against "a b c e"), average length (4 + 2 + 3) / 3;
    # case-folded; an empty hypothesis deletes every word of the reference
    assert multi_reference_ter("A B C D", ["a b c e", "a b", "x y z"]) == (1.0, 3.0)
    assert multi_reference_ter("", ["a b c"]) == (3.0, 3.0)
    # the edit distance is that of a plain Levenshtein when no shift helps and the beam does not cut
    hyp, ref = "the cat sat on a mat".split(), "a cat sat on the hat".split()
    assert T_edits(hyp, ref) == _levenshtein(hyp, ref) == 3


def test_evaluate_splits_seen_unseen_and_all():
    hyps = ["a b c d", "p q r s"]
    refs = [["a b c d"], ["p q r s", "p q"]]
    out = W.evaluate(hyps, refs, ["Airport", "Artist"], meteor="off")
    assert set(out) == {"bleu", "ter"}
    assert out["bleu"]["seen"] == pytest.approx(100) and out["ter"]["all"] == 0.0
    assert W.evaluate(hyps, refs, ["Airport", "Airport"], meteor="off")["bleu"]["unseen"] is None
    with pytest.raises(KpeftError, match="one output line per entry"):
        W.evaluate(hyps[:1], refs, ["Airport", "Artist"], meteor="off")


def test_approximate_meteor_is_labelled_and_sane():
    out = W.evaluate(["the cat sat on the mat"], [["the cat sat on the mat"]], ["Airport"], meteor="approx")
    assert "meteor" not in out and "meteor_approx" in out
    # One chunk, all 6 words matched: Fmean = 1, penalty = 0.6 * (1/6)^0.2.
    assert out["meteor_approx"]["all"] == pytest.approx(1 - 0.6 * (1 / 6) ** 0.2)
    # Stems match ("cats" ~ "cat").
    assert W.meteor_approx(["cats sat"], [["cat sat", "", ""]]) == pytest.approx(1 - 0.6 * 0.5**0.2)


def test_meteor_without_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(W.shutil, "which", lambda name: None)
    with pytest.raises(KpeftError, match=r"needs a Java runtime.*meteor=approx"):
        W.java_executable()


# ---------------------------------------------------------------- the challenge's own outputs
def _official() -> dict:
    return json.loads((CHALLENGE / "official_scores.json").read_text())["systems"]


def _system(team: str) -> list[str]:
    with gzip.open(CHALLENGE / f"{team}.txt.gz", "rt", encoding="utf-8") as f:
        return [line[:-1] for line in f]


def _test_set() -> tuple[list[list[str]], list[str]]:
    from kpeft.tasks.webnlg import entries_from_xml

    entries = entries_from_xml(TEST_XML)
    return [e["references"] for e in entries], [e["category"] for e in entries]


@needs_challenge
@pytest.mark.parametrize("team", ["ADAPT_Centre", "Baseline", "Tilburg_University-3"])
def test_bleu_equals_multi_bleu_on_the_challenge_submissions(team):
    refs, cats = _test_set()
    refs3 = W.reference_triples(refs)
    hyps = [W.preprocess_hypothesis(h) for h in _system(team)]
    assert len(hyps) == 1862
    for subset, printed in _official()[team]["bleu"].items():
        idx = [i for i, c in enumerate(cats) if subset == "all" or W.subset_of(c) == subset]
        official = float(re.search(r"BLEU = ([\d.]+)", printed).group(1))
        ours = W.bleu([hyps[i] for i in idx], [refs3[i] for i in idx])
        assert f"{ours:.2f}" == f"{official:.2f}", (team, subset)


@needs_challenge
@pytest.mark.slow  # one JVM loading METEOR's paraphrase table: ~10-40 s
def test_meteor_equals_the_official_jar_run_on_the_challenge_submissions():
    refs, cats = _test_set()
    index = {s: [i for i, c in enumerate(cats) if s == "all" or W.subset_of(c) == s] for s in W.SUBSETS}
    refs3 = W.reference_triples(refs)
    with W.MeteorJar() as jar:
        for team in ("ADAPT_Centre", "Tilburg_University-3"):  # the latter has 276 empty outputs
            hyps = [W.preprocess_hypothesis(h) for h in _system(team)]
            stats = [jar.stats(h, r) for h, r in zip(hyps, refs3)]
            for subset, printed in _official()[team]["meteor"].items():
                official = float(printed.split()[-1])
                assert jar.aggregate([stats[i] for i in index[subset]]) == official, (team, subset)  # every digit


@needs_challenge
@pytest.mark.slow  # tercom's search in pure Python: about a minute per submission
@pytest.mark.parametrize("team", ["ADAPT_Centre", "Baseline", "Tilburg_University-3"])
def test_ter_equals_tercom_on_the_challenge_submissions(team):
    refs, cats = _test_set()
    refs3 = W.reference_triples(refs)
    hyps = [W.preprocess_hypothesis(h) for h in _system(team)]
    stats = W.ter_segments(hyps, refs3)
    for subset, printed in _official()[team]["ter"].items():  # "Total TER: 0.849... (36781.0/43309.16666666672)"
        idx = [i for i, c in enumerate(cats) if subset == "all" or W.subset_of(c) == subset]
        edits, length = map(float, re.search(r"\(([\d.]+)/([\d.]+)\)", printed).groups())
        # the same edit count and the same float sum of average lengths as tercom 0.7.25
        assert sum(stats[i][0] for i in idx) == edits, (team, subset)
        assert W.ter_from_segments([stats[i] for i in idx]) == float(printed.split()[2]), (team, subset)
        assert sum(stats[i][1] for i in idx) == pytest.approx(length, rel=1e-12)
