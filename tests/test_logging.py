"""Metric logging: CSV always; wandb offline when asked; a clear error without wandb."""

from __future__ import annotations

import csv
import sys

import pytest

from kpeft.errors import KpeftError
from kpeft.train import run

TINY = ("model=tiny_gpt2", "task=demo_reverse", "method=lora", "budget=small", "train.epochs=2")


def test_csv_log_has_every_step_and_epoch(make_cfg):
    rec = run(make_cfg(*TINY))
    with open(f"{rec['run_dir']}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = {r["key"] for r in rows}
    assert keys == {"train/loss", "train/lr", "val/loss"}
    assert len([r for r in rows if r["key"] == "train/loss"]) == rec["training"]["steps"] == 32
    val = [float(r["value"]) for r in rows if r["key"] == "val/loss"]
    assert len(val) == 2 and min(val) == pytest.approx(rec["metrics"]["validation_loss"])


def test_wandb_offline_writes_a_local_run(make_cfg, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rec = run(make_cfg(*TINY, "logger=wandb", "logger.mode=offline"))
    runs = list((__import__("pathlib").Path(rec["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_wandb_missing_is_a_one_line_fix(make_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(KpeftError, match="pip install wandb"):
        run(make_cfg(*TINY, "logger=wandb"))
