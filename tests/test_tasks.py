"""Task plumbing: generated data, encoding, batching, units, and the missing-data error."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from kpeft.errors import KpeftError
from kpeft.tasks import IGNORE, task_class
from kpeft.tasks.base import shift_right
from kpeft.tasks.synthetic import DemoReverse, sentiment_example


def reverse_task(make_cfg, name="demo_reverse"):
    cfg = make_cfg(f"task={name}")
    return task_class(cfg.task)(cfg.task, None, pad_token_id=0)


def test_reverse_encoding_scores_only_target_and_eos(make_cfg):
    task = reverse_task(make_cfg)
    ex = task.encode([5, 6, 7])
    assert ex["input_ids"] == [5, 6, 7, DemoReverse.SEP, 7, 6, 5, DemoReverse.EOS]
    assert ex["labels"] == [IGNORE] * 4 + [7, 6, 5, DemoReverse.EOS]
    batch = task.collate([ex, task.encode([9, 8])])
    assert batch["input_ids"].tolist()[1] == [9, 8, 3, 8, 9, 2, 0, 0]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert task.units(batch) == 4 + 3  # targets + eos of both examples (labels shifted by one)


def test_reverse_seq2seq_encoding(make_cfg):
    task = reverse_task(make_cfg, "demo_reverse_s2s")
    assert task.encode([5, 6]) == {"input_ids": [5, 6, 2], "labels": [6, 5, 2]}
    config = OmegaConf.create({"decoder_start_token_id": 0, "pad_token_id": 0})
    labels = torch.tensor([[6, 5, 2, IGNORE]])
    assert shift_right(labels, config).tolist() == [[0, 6, 5, 2]]


def test_generated_splits_are_deterministic_and_sized(make_cfg):
    task = reverse_task(make_cfg)
    a, b = task.load_splits(), task.load_splits()
    assert a == b and [len(a[s]) for s in ("train", "validation", "test")] == [512, 64, 128]


def test_sentiment_generator_covers_negation_and_contrast():
    import random

    rng = random.Random(0)
    rows = [sentiment_example(rng) for _ in range(2000)]
    assert {label for _, label in rows} == {0, 1}
    assert 0.4 < sum(label for _, label in rows) / len(rows) < 0.6
    assert any(" not " in t for t, _ in rows) and any(", but " in t for t, _ in rows)


def test_missing_data_names_the_fix(make_cfg, tmp_path):
    task = reverse_task(make_cfg)
    with pytest.raises(KpeftError, match="task.data_dir=DIR, or load it from the hub"):
        task.data_dir(["train.json"])
    task.cfg.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(KpeftError, match="does not exist"):
        task.data_dir(["train.json"], how_to_get="see the README's Tasks section")
    task.cfg.data_dir = str(tmp_path)
    with pytest.raises(KpeftError, match="lacks train.json"):
        task.data_dir(["train.json"])
    (tmp_path / "train.json").write_text("[]")
    assert task.data_dir(["train.json"]) == tmp_path
