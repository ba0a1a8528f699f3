"""Encoded splits cached between the runs of a sweep (kpeft/training/encoded_cache.py): a second run
of the same task reads them instead of encoding, its record lists the same data files, and any change
to the data, the task config or the tokenizer encodes again."""

from __future__ import annotations

import os
import shutil

import pytest
from helpers import FIXTURES

from kpeft import datafiles
from kpeft.paths import packaged_tokenizer
from kpeft.tasks.webnlg import WebNLG
from kpeft.train import build


@pytest.fixture
def cached(monkeypatch, tmp_path):
    """The cache on (the suite turns it off, tests/conftest.py) in a temporary $KPEFT_CACHE, and a
    counter of real encodings."""
    monkeypatch.delenv("KPEFT_NO_ENCODED_CACHE", raising=False)
    monkeypatch.setenv("KPEFT_CACHE", str(tmp_path / "cache"))
    calls: list[int] = []
    real = WebNLG.load_splits

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(WebNLG, "load_splits", counting)
    return calls


def test_a_second_build_reads_the_encoded_splits_and_reports_the_same_data_files(cached, make_cfg, tmp_path):
    data = shutil.copytree(FIXTURES / "webnlg2017", tmp_path / "webnlg")
    args = ["model=tiny_gpt2", f"model.tokenizer={packaged_tokenizer('gpt2')}", "task=webnlg", f"task.data_dir={data}",
            "task.options.max_train_examples=20", "task.options.max_eval_examples=8", "method=lora", "budget=tiny"]

    def encode(*more: str):
        datafiles.reset()
        _, _, splits = build(make_cfg(*args, *more))
        return splits, datafiles.snapshot()

    first, files = encode()
    assert len(cached) == 1 and len(first["train"]) == 20 and files["files"]
    assert len(list((tmp_path / "cache" / "encoded").glob("webnlg-*.pkl"))) == 1
    again, files_again = encode()
    assert len(cached) == 1  # read, not encoded
    assert again == first and files_again == files  # the same examples; the record's data section unchanged
    encode("task.max_length=64")  # another task config: another key
    assert len(cached) == 2
    train_file = next((data / "train").rglob("*.xml"))
    os.utime(train_file, ns=(1, 1))  # the data changed (its modification time): encoded again
    encode()
    assert len(cached) == 3


def test_no_cache_without_a_data_dir_or_when_turned_off(cached, make_cfg, monkeypatch, tmp_path):
    from kpeft.training.encoded_cache import cache_key

    cfg = make_cfg("model=tiny_gpt2", "task=webnlg")
    assert cfg.task.data_dir is None and cache_key(cfg.task, object(), 1024) is None  # the hub: datasets caches
    monkeypatch.setenv("KPEFT_NO_ENCODED_CACHE", "1")
    args = ["model=tiny_gpt2", f"model.tokenizer={packaged_tokenizer('gpt2')}", "task=webnlg",
            f"task.data_dir={FIXTURES / 'webnlg2017'}", "task.options.max_train_examples=4",
            "task.options.max_eval_examples=4", "method=lora", "budget=tiny"]
    build(make_cfg(*args))
    build(make_cfg(*args))
    assert len(cached) == 2 and not (tmp_path / "cache" / "encoded").exists()
