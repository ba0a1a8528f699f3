"""Run records: atomic, complete, never silently overwritten; re-runs skip finished runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kpeft import records
from kpeft.records import RecordExists, is_complete, iter_records, read_record, write_record
from kpeft.train import run


def test_write_is_atomic_and_never_overwrites(tmp_path):
    path = write_record(tmp_path, {"status": "complete", "score": 1.0})
    assert read_record(tmp_path)["score"] == 1.0 and is_complete(tmp_path)
    with pytest.raises(RecordExists):
        write_record(tmp_path, {"status": "complete", "score": 2.0})
    assert read_record(path)["score"] == 1.0
    write_record(tmp_path, {"status": "complete", "score": 3.0}, force=True)
    assert read_record(path)["score"] == 3.0
    kept = sorted(tmp_path.glob("record.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["score"] == 1.0  # kept aside, not lost
    assert [r["score"] for _, r in iter_records(tmp_path)] == [3.0]


def test_a_crash_while_writing_leaves_no_half_record(tmp_path, monkeypatch):
    write_record(tmp_path / "a", {"status": "complete", "score": 1.0})

    def boom(*_args, **_kw):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "replace", boom)
    with pytest.raises(OSError):
        records.write_json_atomic(tmp_path / "b" / "record.json", {"status": "complete"})
    assert not (tmp_path / "b" / "record.json").exists()
    assert not list((tmp_path / "b").glob("*.tmp"))  # the temporary file is cleaned up
    assert read_record(tmp_path / "a")["score"] == 1.0


def test_record_describes_the_run(make_cfg):
    rec = run(make_cfg("model=tiny_gpt2", "task=demo_reverse", "method=lora", "budget=small", "seed=5"))
    on_disk = read_record(rec["run_dir"])
    assert on_disk == json.loads(json.dumps(rec, default=str))
    assert Path(rec["run_dir"]).parts[-5:] == ("default", "demo_reverse", "tiny_gpt2", "lora-small", "seed5")
    assert rec["seed"] == 5 and rec["config"]["seed"] == 5
    assert rec["config"]["method"]["components"]["lora"]["r"] == 4  # resolved from the budget
    assert rec["params"]["trainable"] == rec["params"]["stored"] > 0
    assert set(rec["versions"]) >= {"python", "torch", "transformers", "accelerate", "hydra-core"}
    assert rec["git"]["commit"] is None or len(rec["git"]["commit"]) == 40
    assert isinstance(rec["git"]["dirty"], (bool, type(None)))
    assert rec["hardware"]["cpu_count"] == os.cpu_count()
    assert rec["timing"]["wall_seconds"] >= rec["timing"]["train_seconds"] > 0


def test_rerun_skips_a_finished_run_unless_forced(make_cfg, tmp_path):
    overrides = ("model=tiny_gpt2", "task=demo_reverse", "method=lora", "budget=small")
    first = run(make_cfg(*overrides, root=tmp_path))
    mtime = os.stat(Path(first["run_dir"]) / "record.json").st_mtime_ns
    again = run(make_cfg(*overrides, root=tmp_path))
    assert again == json.loads(json.dumps(first, default=str))
    assert os.stat(Path(first["run_dir"]) / "record.json").st_mtime_ns == mtime
    run(make_cfg(*overrides, "force=true", root=tmp_path))
    assert len(list(Path(first["run_dir"]).glob("record.*.json"))) == 1
