"""CoQA's official evaluate-v1.0 semantics, computed by hand."""

from __future__ import annotations

import pytest

from kpeft.errors import KpeftError
from kpeft.metrics import coqa as C


def test_normalisation():
    assert C.normalize_answer("The U.S.A.!") == "usa"
    assert C.normalize_answer("  An apple, a PEAR and the  fig ") == "apple pear and fig"
    assert C.normalize_answer("Théâtre") == "théâtre"  # no unicode folding
    assert C.normalize_answer("three") != C.normalize_answer("3")  # no number words
    assert C.normalize_answer("other") == "other"  # articles only at word boundaries


def test_exact_match_and_f1_by_hand():
    assert C.exact_match("The cat", "cat.") == 1
    # gold "white kitten" vs pred "a white cat": tokens [white, kitten] / [white, cat]: one in
    # common, P = R = 1/2, F1 = 1/2.
    assert C.f1("white kitten", "a white cat") == 0.5
    # multiset overlap: gold "a a b" -> [b] (articles dropped); "x x y" vs "x y y": common {x, y}
    # = 2, P = R = 2/3.
    assert C.f1("x x y", "x y y") == pytest.approx(2 / 3)
    # no-answer on one side: 1 iff both are empty after normalisation
    assert C.f1("the", "a") == 1.0 and C.f1("the", "cat") == 0.0 and C.f1("", "") == 1.0


def test_leave_one_out_over_several_golds():
    # golds [A="white", B="white", C="orange"], pred "white":
    # leave A out -> max(B, C) = 1; leave B out -> 1; leave C out -> max(A, B) = 1  => EM 1
    assert C.turn_score(["white", "white", "orange"], "white") == (1.0, 1.0)
    # golds [A="white", B="orange"], pred "white": leave A out -> B = 0; leave B out -> A = 1 => 1/2
    assert C.turn_score(["white", "orange"], "white") == (0.5, 0.5)
    # one gold: plain comparison
    assert C.turn_score(["white cat"], "white") == (0.0, pytest.approx(2 / 3))


def _data():
    def story(sid, source, answers, extra):
        return {
            "id": sid, "source": source, "story": "...",
            "questions": [{"turn_id": i + 1, "input_text": f"q{i}"} for i in range(len(answers))],
            "answers": [{"turn_id": i + 1, "input_text": a} for i, a in enumerate(answers)],
            "additional_answers": {"0": [{"turn_id": i + 1, "input_text": a} for i, a in enumerate(extra)]},
        }

    return {"data": [story("s1", "mctest", ["white", "two"], ["white", "2"]),
                     story("s2", "reddit", ["yes"], ["no"])]}


def test_aggregation_by_domain_and_overall_mean_over_turns():
    golds, sources = C.gold_from_json(_data())
    assert golds[("s1", 2)] == ["two", "2"]
    preds = C.predictions_from_json([
        {"id": "s1", "turn_id": 1, "answer": "White."},
        {"id": "s1", "turn_id": 2, "answer": "three"},
        {"id": "s1", "turn_id": 2, "answer": "two"},  # a later duplicate overwrites
        {"id": "nope", "turn_id": 1, "answer": "ignored"},
    ])
    out = C.evaluate(golds, sources, preds)
    # s1 turn 1: golds [white, white] -> 1; s1 turn 2: [two, 2] pred "two" -> (0 + 1) / 2 = 0.5;
    # s2 turn 1 has no prediction -> 0. children_stories = 1.5 / 2 = 75.0; reddit = 0.0;
    # overall = 1.5 / 3 turns = 50.0 (not the mean of the domain means, 37.5).
    assert out["domains"]["children_stories"] == {"em": 75.0, "f1": 75.0, "turns": 2}
    assert out["domains"]["reddit"] == {"em": 0.0, "f1": 0.0, "turns": 1}
    assert out["domains"]["literature"] == {"em": 0.0, "f1": 0.0, "turns": 0}
    assert out["in_domain"] == {"em": 75.0, "f1": 75.0, "turns": 2}
    assert out["out_domain"]["turns"] == 1
    assert (out["em"], out["f1"], out["turns"]) == (50.0, 50.0, 3)


def test_rounding_is_the_official_expression():
    # round(total / n * 100, 1): 1 / 3 * 100 = 33.33... -> 33.3; 2 / 3 -> 66.7
    golds = {("s", 1): ["a b c"], ("s", 2): ["x"], ("s", 3): ["y"]}
    out = C.evaluate(golds, {"s": "cnn"}, {("s", 1): "a b c", ("s", 2): "x", ("s", 3): "z"})
    assert (out["em"], out["f1"]) == (66.7, 66.7)


def test_bad_inputs_are_one_line_errors():
    data = _data()
    del data["data"][0]["additional_answers"]
    with pytest.raises(KpeftError, match="no additional_answers"):
        C.gold_from_json(data)
    assert C.gold_from_json(data, require_additional=False)[0][("s1", 1)] == ["white"]
    with pytest.raises(KpeftError, match="JSON list"):
        C.predictions_from_json([{"id": "s1"}])
