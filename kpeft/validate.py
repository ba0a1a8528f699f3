"""Ranges and relations of a composed config, checked before any work (docs/runs.md lists them).

Types are checked by the schemas (kpeft/config.py) at composition; this checks values: every
violation is a :class:`KpeftError` naming the key, the value and the valid range.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from kpeft.errors import KpeftError

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
FIDELITY = ("paper", "code")
TASK_KINDS = ("classification", "causal_lm", "seq2seq")
# task.options entries that cap a size: null (no cap) or ≥ 1.
POSITIVE_OPTIONS = ("max_train_examples", "max_eval_examples", "max_new_tokens", "max_source_tokens",
                    "max_target_tokens", "max_document_tokens", "generation_batch_size")


def _fail(key: str, value: Any, rule: str) -> None:
    raise KpeftError(f"{key}={value} is out of range: {rule}")


def _at_least(cfg: DictConfig, key: str, low: float, optional: bool = False) -> None:
    value = cfg[key.rsplit(".", 1)[-1]]
    if value is None and optional:
        return
    if value is None or value < low:
        _fail(key, value, f"it must be ≥ {low:g}" + (" (or null)" if optional else ""))


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KpeftError(f"{key}={value} is not valid; valid: {', '.join(allowed)}")


def check_train(t: DictConfig) -> None:
    """``train.*``: positive sizes and rates, warm-up within the steps, valid choices."""
    if not t.lr > 0:
        _fail("train.lr", t.lr, "the learning rate must be > 0")
    for key in ("batch_size", "grad_accum", "eval_batch_size"):
        _at_least(t, f"train.{key}", 1)
    _at_least(t, "train.per_device_batch_size", 1, optional=True)
    _at_least(t, "train.max_steps", 1, optional=True)
    if t.max_steps is None:
        _at_least(t, "train.epochs", 1)
    if t.batch_size % t.grad_accum:
        raise KpeftError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    for key in ("warmup_steps", "weight_decay", "max_grad_norm", "early_stopping_patience",
                "checkpoint_every_steps", "num_workers", "eval_every_steps"):
        _at_least(t, f"train.{key}", 0)
    _at_least(t, "train.val_generation_examples", 1, optional=True)
    if not str(t.select_by).strip():
        _fail("train.select_by", "''", "name val_loss or a validation metric of the task (e.g. accuracy, bleu_all)")
    if not 0.0 <= t.warmup_ratio <= 1.0:
        _fail("train.warmup_ratio", t.warmup_ratio, "it must be in [0, 1]")
    if t.max_steps is not None and t.warmup_steps > t.max_steps:
        raise KpeftError(f"train.warmup_steps={t.warmup_steps} exceeds train.max_steps={t.max_steps}; "
                         "lower the warm-up or raise max_steps")
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        _fail("train.adam_betas", list(t.adam_betas), "two values in [0, 1)")
    if not t.adam_eps > 0:
        _fail("train.adam_eps", t.adam_eps, "it must be > 0")
    if not 0.0 <= t.label_smoothing < 1.0:
        _fail("train.label_smoothing", t.label_smoothing, "it must be in [0, 1)")
    _at_least(t, "train.crash_after_steps", 1, optional=True)
    _one_of("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)


def check_task(task: DictConfig) -> None:
    """``task.*``: a known kind, a positive length, size caps ≥ 1."""
    _one_of("task.kind", task.kind, TASK_KINDS)
    _at_least(task, "task.max_length", 1)
    _at_least(task, "task.num_labels", 0)
    options = task.options or {}
    for key in POSITIVE_OPTIONS:
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            _fail(f"task.options.{key}", value, "a whole number ≥ 1 (or null)")
    if options.get("max_history") is not None and options.get("max_history") < 0:
        _fail("task.options.max_history", options.get("max_history"), "it must be ≥ 0")


def check_config(cfg: DictConfig) -> None:
    """Every range and relation of a composed root config."""
    _one_of("fidelity", cfg.fidelity, FIDELITY)
    check_train(cfg.train)
    check_task(cfg.task)
