"""The metric columns the papers print for each task (used when a preset lists none)."""

from __future__ import annotations

from omegaconf import OmegaConf

from kpeft.config import CONF_DIR
from kpeft.experiments.spec import Column


def _webnlg() -> list[Column]:
    # [KM]/[IT] Table 1 and prefix-tuning: BLEU, METEOR, TER on seen (S), unseen (U), all (A).
    cols = []
    for metric, label, lower, digits in (("bleu", "BLEU", False, 2), ("meteor", "MET", False, 2),
                                         ("ter", "TER", True, 2)):
        for subset, s in (("seen", "S"), ("unseen", "U"), ("all", "A")):
            per_example = "sentence_bleu" if metric == "bleu" else None
            cols.append(Column(f"{metric}_{subset}", f"{label}-{s}", lower, digits, example_score=per_example,
                               example_subset=None if subset == "all" else subset))
    return cols


STANDARD: dict[str, list[Column]] = {
    "webnlg": _webnlg(),
    "coqa": [Column("f1", "F1", example_score="f1"), Column("em", "EM", example_score="em")],
    "cnndm": [Column("rouge2", "R-2", example_score="rouge2")],
    "glue_mnli": [Column("mnli_mm", "MNLI-mm"), Column("mnli_m", "MNLI-m")],
    "glue_sst2": [Column("accuracy", "Acc", example_score="score")],
    "glue_qnli": [Column("accuracy", "Acc", example_score="score")],
    "glue_rte": [Column("accuracy", "Acc", example_score="score")],
    "glue_cola": [Column("mcc", "MCC")],
    "glue_mrpc": [Column("f1", "F1")],
    "glue_qqp": [Column("accuracy", "Acc", example_score="score")],
    "glue_stsb": [Column("pearson", "Pearson")],
    # The E2E challenge's five metrics as the LoRA and prefix-tuning tables print them (the
    # scorer's fractions × 100, NIST and CIDEr as they are); per-MR BLEU, ROUGE-L, CIDEr.
    "e2e": [Column("bleu", "BLEU", digits=1, scale=100, example_score="bleu"), Column("nist", "NIST"),
            Column("meteor", "MET", digits=1, scale=100), Column("rouge_l", "ROUGE-L", digits=1, scale=100,
                                                                  example_score="rouge_l"),
            Column("cider", "CIDEr", example_score="cider")],
}


def task_metric(task: str) -> str:
    """The headline metric of `task` (its YAML's ``task.metric``)."""
    path = CONF_DIR / "task" / f"{task}.yaml"
    if not path.exists():
        return "score"
    node = OmegaConf.load(path)
    return str(OmegaConf.select(node, "task.metric", default="score"))


def standard(task: str) -> list[Column]:
    """The paper columns of `task`, or its headline metric."""
    if task in STANDARD:
        return [Column(**vars(c)) for c in STANDARD[task]]
    metric = task_metric(task)
    return [Column(metric, metric)]
