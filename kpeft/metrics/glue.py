"""GLUE's official metrics (docs/benchmarks.md), all ×100 as the papers print them.

| task | metrics |
|---|---|
| SST-2, QNLI, RTE | accuracy |
| MNLI | accuracy on matched (``mnli_m``) and mismatched (``mnli_mm``) dev |
| CoLA | Matthews correlation (``mcc``) |
| MRPC, QQP | F1 of the positive class (``f1``) and accuracy |
| STS-B | Pearson and Spearman correlation (``scipy.stats``) |

Matthews correlation is sklearn's multi-class formula (0 when undefined); F1 is the binary F1 of
label 1 (0 when there is no true or predicted positive), as GLUE's scorer (sklearn) computes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from kpeft.errors import KpeftError

# The metrics of each GLUE task, headline first.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "sst2": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "mnli": ("mnli_m", "mnli_mm"),
    "cola": ("mcc",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
}


def _check(preds: Sequence, labels: Sequence) -> None:
    if len(preds) != len(labels):
        raise KpeftError(f"{len(preds)} predictions for {len(labels)} examples: one per example")
    if not labels:
        raise KpeftError("a GLUE metric of an empty split")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check(preds, labels)
    return 100.0 * sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation ×100 (sklearn's multi-class form; binary = (TP·TN − FP·FN)/√…)."""
    _check(preds, labels)
    classes = sorted(set(labels) | set(preds))
    n = len(labels)
    t = [sum(1 for y in labels if y == c) for c in classes]  # true count per class
    p = [sum(1 for q in preds if q == c) for c in classes]  # predicted count per class
    correct = sum(int(q == y) for q, y in zip(preds, labels))
    cov_ytyp = correct * n - sum(tk * pk for tk, pk in zip(t, p))
    cov_ypyp = n * n - sum(pk * pk for pk in p)
    cov_ytyt = n * n - sum(tk * tk for tk in t)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return 100.0 * cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 ×100 of the positive class."""
    _check(preds, labels)
    tp = sum(1 for q, y in zip(preds, labels) if q == positive and y == positive)
    fp = sum(1 for q, y in zip(preds, labels) if q == positive and y != positive)
    fn = sum(1 for q, y in zip(preds, labels) if q != positive and y == positive)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    _check(preds, labels)
    return 100.0 * float(pearsonr(preds, labels)[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    _check(preds, labels)
    return 100.0 * float(spearmanr(preds, labels)[0])


def classification_stats(preds: Sequence[int], labels: Sequence[int], subsets: Sequence[str] | None = None,
                         binary: bool = False) -> dict[str, float]:
    """The summable statistics :func:`metrics_from_stats` reads: ``n``, ``correct``; with `binary`,
    the confusion counts of label 1; with MNLI `subsets`, the matched / mismatched counts. Training
    evaluation sums the same statistics over batches (``GlueTask.batch_metrics``)."""
    hits = [p == y for p, y in zip(preds, labels)]
    stats = {"n": float(len(labels)), "correct": float(sum(hits))}
    if binary:
        pairs = list(zip(preds, labels))
        stats.update(tp=float(sum(p == 1 and y == 1 for p, y in pairs)), fp=float(sum(p == 1 and y != 1 for p, y in pairs)),
                     fn=float(sum(p != 1 and y == 1 for p, y in pairs)), tn=float(sum(p != 1 and y != 1 for p, y in pairs)))
    if subsets is not None:
        mm = [s == "mismatched" for s in subsets]
        stats.update(n_m=float(mm.count(False)), correct_m=float(sum(h for h, m in zip(hits, mm) if not m)),
                     n_mm=float(mm.count(True)), correct_mm=float(sum(h for h, m in zip(hits, mm) if m)))
    return stats


def regression_stats(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The moments :func:`metrics_from_stats` turns into Pearson's r (STS-B)."""
    x, y = [float(v) for v in preds], [float(v) for v in labels]
    return {"n": float(len(y)), "sx": sum(x), "sy": sum(y), "sxx": sum(v * v for v in x), "syy": sum(v * v for v in y),
            "sxy": sum(a * b for a, b in zip(x, y))}


def metrics_from_stats(totals: dict[str, float]) -> dict[str, float]:
    """GLUE's metrics ×100 from summable statistics: accuracy; F1 of label 1 and the (binary)
    Matthews correlation from confusion counts; MNLI matched / mismatched accuracy; Pearson's r from
    moments. The one formula behind training evaluation and :func:`glue_metrics` (``kpeft.score``)."""
    n = max(totals.get("n", 0.0), 1.0)
    if "sxy" in totals:
        cov = n * totals["sxy"] - totals["sx"] * totals["sy"]
        var = (n * totals["sxx"] - totals["sx"] ** 2) * (n * totals["syy"] - totals["sy"] ** 2)
        return {"pearson": 100.0 * cov / math.sqrt(var) if var > 0 else 0.0}
    out = {"accuracy": 100.0 * totals["correct"] / n}
    if "tp" in totals:
        tp, fp, fn, tn = (totals[k] for k in ("tp", "fp", "fn", "tn"))
        out["f1"] = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = 100.0 * (tp * tn - fp * fn) / den if den else 0.0
    if "n_m" in totals:
        if totals["n_m"]:
            out["mnli_m"] = 100.0 * totals["correct_m"] / totals["n_m"]
        if totals["n_mm"]:
            out["mnli_mm"] = 100.0 * totals["correct_mm"] / totals["n_mm"]
    return out


def glue_metrics(
    task: str, preds: Sequence, labels: Sequence, subsets: Sequence[str] | None = None
) -> dict[str, float]:
    """The official metrics of GLUE task ``task`` (``sst2``, ``mnli``, …), through
    :func:`metrics_from_stats` (Spearman: scipy on the values). MNLI needs ``subsets``
    (``"matched"`` / ``"mismatched"`` per example)."""
    if task not in TASK_METRICS:
        raise KpeftError(f"unknown GLUE task '{task}'; valid: {', '.join(TASK_METRICS)}")
    _check(preds, labels)
    if task == "mnli" and (subsets is None or len(subsets) != len(labels)):
        raise KpeftError("MNLI scoring needs the matched/mismatched subset of every example")
    if task == "stsb":
        return {**metrics_from_stats(regression_stats(preds, labels)), "spearman": spearman(preds, labels)}
    binary = set(labels) | set(preds) <= {0, 1}
    got = metrics_from_stats(classification_stats(preds, labels, subsets if task == "mnli" else None, binary))
    if not binary and "mcc" in TASK_METRICS[task]:
        got["mcc"] = matthews_corrcoef(preds, labels)  # sklearn's multi-class form
    return {name: got[name] for name in TASK_METRICS[task] if name in got}
