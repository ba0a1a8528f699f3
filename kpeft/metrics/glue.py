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


def glue_metrics(
    task: str, preds: Sequence, labels: Sequence, subsets: Sequence[str] | None = None
) -> dict[str, float]:
    """The official metrics of GLUE task ``task`` (``sst2``, ``mnli``, …). MNLI needs ``subsets``
    (``"matched"`` / ``"mismatched"`` per example)."""
    if task not in TASK_METRICS:
        raise KpeftError(f"unknown GLUE task '{task}'; valid: {', '.join(TASK_METRICS)}")
    _check(preds, labels)
    if task == "mnli":
        if subsets is None or len(subsets) != len(labels):
            raise KpeftError("MNLI scoring needs the matched/mismatched subset of every example")
        out = {}
        for key, name in (("mnli_m", "matched"), ("mnli_mm", "mismatched")):
            idx = [i for i, s in enumerate(subsets) if s == name]
            if idx:
                out[key] = accuracy([preds[i] for i in idx], [labels[i] for i in idx])
        return out
    fns = {"accuracy": accuracy, "mcc": matthews_corrcoef, "f1": f1_binary, "pearson": pearson, "spearman": spearman}
    return {name: fns[name](preds, labels) for name in TASK_METRICS[task]}
