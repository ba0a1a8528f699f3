"""CoQA loader on the real official-layout samples, the held-out validation split, the hub adapter
and the score CLI round trip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import FIXTURES

from kpeft.errors import KpeftError
from kpeft.tasks import task_class
from kpeft.tasks.coqa import story_from_hub

DATA = FIXTURES / "coqa"
DEV, TRAIN = DATA / "coqa-dev-v1.0.first_story.json", DATA / "coqa-train-v1.0.first_story.json"


@pytest.fixture
def coqa_dir(tmp_path):
    """The real samples under the official file names, plus two made-up training dialogues."""
    shutil.copy(DEV, tmp_path / "coqa-dev-v1.0.json")
    train = json.loads(TRAIN.read_text())
    for k in (1, 2):
        extra = json.loads(json.dumps(train["data"][0]))
        extra["id"] = f"made-up-{k}"
        train["data"].append(extra)
    (tmp_path / "coqa-train-v1.0.json").write_text(json.dumps(train))
    return tmp_path


def coqa(make_cfg, data_dir, *overrides):
    cfg = make_cfg("task=coqa", f"task.data_dir={data_dir}", "task.options.n_validation=1", *overrides)
    return task_class(cfg.task)(cfg.task)


def test_test_split_is_the_official_dev_file(make_cfg, coqa_dir):
    turns = coqa(make_cfg, coqa_dir).records("test")
    assert len(turns) == 12 and {t["id"] for t in turns} == {"3dr23u6we5exclen4th8uq9rb42tel"}
    first, third = turns[0], turns[2]
    assert first["source"] == "mctest" and first["question"] == "What color was Cotton?"
    assert len(first["golds"]) == 4 and first["answer"] == first["golds"][0] == "white"
    # history = the last 2*2+1 utterances: q1 a1 q2 a2 q3 for the third turn
    assert third["history"] == [first["question"], "white", turns[1]["question"], turns[1]["answer"], third["question"]]
    assert len(turns[-1]["history"]) == 5


def test_validation_dialogues_are_held_out_seeded(make_cfg, coqa_dir):
    task = coqa(make_cfg, coqa_dir)
    train, val = task.stories("train"), task.stories("validation")
    assert len(train) == 2 and len(val) == 1 and not {s["id"] for s in train} & {s["id"] for s in val}
    again = coqa(make_cfg, coqa_dir).stories("validation")
    assert [s["id"] for s in again] == [s["id"] for s in val]
    assert len(task.records("train")) == 40  # 20 turns per dialogue
    assert coqa(make_cfg, coqa_dir, "task.options.max_history=1").records("train")[5]["history"][-1].endswith("?")
    with pytest.raises(KpeftError, match="cannot hold out 500 of 3"):
        coqa(make_cfg, coqa_dir, "task.options.n_validation=500").records("train")


def test_missing_files_name_the_layout(make_cfg, tmp_path):
    with pytest.raises(KpeftError, match=r"lacks coqa-dev-v1.0.json; it should hold the official CoQA JSON"):
        coqa(make_cfg, tmp_path).records("test")


def test_hub_adapter(make_cfg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    row = {"source": "wikipedia", "story": "S.", "questions": ["Who?", "Why?"],
           "answers": {"input_text": ["me", "because"], "answer_start": [0, 1], "answer_end": [1, 2]}}
    story = story_from_hub(row, 3, "validation")
    assert story["id"] == "validation-3" and story["answers"][1] == {"turn_id": 2, "input_text": "because"}
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_list([row, row]), "validation": datasets.Dataset.from_list([row])})
    import kpeft.tasks.benchmark as benchmark

    monkeypatch.setattr(benchmark, "load_hub", lambda path, name, layout: ds)
    cfg = make_cfg("task=coqa", "task.options.n_validation=1")
    task = task_class(cfg.task)(cfg.task)
    assert [r["answer"] for r in task.records("test")] == ["me", "because"]
    assert task.score([{"id": "validation-0", "turn_id": 1, "answer": "me"}])["em"] == 50.0


def test_score_cli_round_trip(coqa_dir, tmp_path):
    dev = json.loads((coqa_dir / "coqa-dev-v1.0.json").read_text())["data"][0]
    preds = [{"id": dev["id"], "turn_id": a["turn_id"], "answer": a["input_text"]} for a in dev["answers"]]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))
    out = subprocess.run([sys.executable, "-m", "kpeft.score", "task=coqa", f"predictions={path}",
                          f"task.data_dir={coqa_dir}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"em", "f1", "in_domain", "out_domain", "domains"} <= set(scores)
    assert scores["turns"] == 12 and scores["domains"]["children_stories"]["turns"] == 12
    assert scores["out_domain"]["turns"] == 0 and scores["in_domain"]["em"] == scores["em"]
    # Predicting annotator 0's answers scores below 100: each turn is judged against the OTHER three
    # annotators once (leave-one-out), as the official scorer does.
    assert 80 < scores["f1"] < 100
