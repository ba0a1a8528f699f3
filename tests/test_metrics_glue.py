"""GLUE metrics by hand, and one scorer test per task's metric set."""

from __future__ import annotations

import math

import pytest

from kpeft.errors import KpeftError
from kpeft.metrics import glue as G

# preds / labels with TP = 3, TN = 2, FP = 1, FN = 1
PRED = [1, 1, 1, 1, 0, 0, 0]
GOLD = [1, 1, 1, 0, 0, 0, 1]


def test_accuracy_f1_mcc_by_hand():
    assert G.accuracy(PRED, GOLD) == pytest.approx(100 * 5 / 7)
    assert G.f1_binary(PRED, GOLD) == pytest.approx(100 * 2 * 3 / (2 * 3 + 1 + 1))  # 75
    # MCC = (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 − 1) / √(4·4·3·3) = 5/12
    assert G.matthews_corrcoef(PRED, GOLD) == pytest.approx(100 * 5 / 12)
    assert G.matthews_corrcoef([1, 1], [1, 0]) == 0.0  # undefined -> 0, as sklearn
    assert G.f1_binary([0, 0], [0, 0]) == 0.0


def test_multiclass_mcc_matches_the_binary_formula_and_is_symmetric():
    assert G.matthews_corrcoef(GOLD, PRED) == pytest.approx(G.matthews_corrcoef(PRED, GOLD))
    # perfect 3-class prediction -> 1; a constant prediction -> 0
    assert G.matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(100.0)
    assert G.matthews_corrcoef([0, 0, 0], [0, 1, 2]) == 0.0


def test_pearson_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # Pearson: means 2.5; cov = (2.25 + -0.5·0.5 + 0.5·-0.5 + 2.25) = 4; var = 5 each -> 0.8
    assert G.pearson(x, y) == pytest.approx(80.0)
    # Spearman on ranks (same as the values here) -> also 0.8
    assert G.spearman(x, y) == pytest.approx(80.0)
    assert G.spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(100.0)  # monotone, not linear
    assert G.pearson([1, 2, 3], [10, 20, 1000]) < 100.0


@pytest.mark.parametrize(
    ("task", "preds", "labels", "expected"),
    [
        ("sst2", PRED, GOLD, {"accuracy": 100 * 5 / 7}),
        ("qnli", [0, 1], [0, 0], {"accuracy": 50.0}),
        ("rte", [1, 1], [1, 1], {"accuracy": 100.0}),
        ("cola", PRED, GOLD, {"mcc": 100 * 5 / 12}),
        ("mrpc", PRED, GOLD, {"f1": 75.0, "accuracy": 100 * 5 / 7}),
        ("qqp", PRED, GOLD, {"f1": 75.0, "accuracy": 100 * 5 / 7}),
        ("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], {"pearson": 80.0, "spearman": 80.0}),
    ],
)
def test_every_task_scores_its_official_metrics(task, preds, labels, expected):
    out = G.glue_metrics(task, preds, labels)
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value)


def test_mnli_scores_matched_and_mismatched_separately():
    out = G.glue_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2], ["matched", "matched", "mismatched", "mismatched"])
    assert out == {"mnli_m": 100.0, "mnli_mm": 50.0}
    with pytest.raises(KpeftError, match="matched/mismatched"):
        G.glue_metrics("mnli", [0], [0])


def test_errors():
    with pytest.raises(KpeftError, match="2 predictions for 3"):
        G.accuracy([0, 1], [0, 1, 1])
    with pytest.raises(KpeftError, match="unknown GLUE task"):
        G.glue_metrics("wnli", [0], [0])
    assert math.isfinite(G.pearson([1.0, 2.0], [2.0, 5.0]))
