"""CNN/DM loaders: raw .story files with URL lists, line-aligned files, the hub adapter, scoring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import FIXTURES

from kpeft.errors import KpeftError
from kpeft.metrics.rouge import sentences
from kpeft.tasks import task_class
from kpeft.tasks.cnndm import read_story, url_hash

DATA = FIXTURES / "cnn_dm"
STORIES, REALSUMM = DATA / "stories", DATA / "realsumm_test100"


def cnndm(make_cfg, data_dir):
    cfg = make_cfg("task=cnndm", f"task.data_dir={data_dir}")
    return task_class(cfg.task)(cfg.task)


def test_story_files_with_url_lists(make_cfg):
    task = cnndm(make_cfg, STORIES)
    train, val = task.records("train"), task.records("validation")
    assert len(train) == len(val) == 10
    urls = [u for u in (STORIES / "url_lists_all_train.txt").read_text().splitlines() if u.strip()]
    assert {r["id"] for r in train} == {url_hash(u) for u in urls}
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)  # the hub's order: by file name
    with pytest.raises(KpeftError, match="neither test.source/test.target nor the URL list all_test.txt"):
        task.records("test")


def test_story_reading_matches_the_hub_reader(tmp_path):
    story = tmp_path / "x.story"
    story.write_text("First line\n\nSecond one.\n\n@highlight\n\nA highlight\n\n@highlight\n\nAnother!\n")
    article, highlights = read_story(story)
    assert article == "First line . Second one."  # a period added to the line without one
    assert highlights == "A highlight .\nAnother!"
    first = next(STORIES.glob("*.story"))
    article, highlights = read_story(first)
    assert article and "@highlight" not in article and highlights.count("\n") >= 1


def test_line_aligned_files_and_score_cli(make_cfg, tmp_path):
    shutil.copy(REALSUMM / "src.txt", tmp_path / "test.source")
    shutil.copy(REALSUMM / "ref.txt", tmp_path / "test.target")
    records = cnndm(make_cfg, tmp_path).records("test")
    assert len(records) == 100 and records[0]["highlights"].startswith("anuradha koirala")
    assert "<t>" not in records[0]["highlights"]
    preds = tmp_path / "preds.txt"
    preds.write_text("".join(r["highlights"].replace("\n", " <n> ") + "\n" for r in records))
    out = subprocess.run([sys.executable, "-m", "kpeft.score", "task=cnndm", f"predictions={preds}",
                          f"task.data_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "rouge2_vglm"}
    assert scores["rouge2"] == pytest.approx(100.0) and scores["rougeLsum"] == pytest.approx(100.0)
    # the lead-3 baseline of the first article: a real, mid-range score
    lead = [" ".join(r["article"].replace("<t>", "").replace("</t>", "").split()[:60]) for r in records]
    preds.write_text("".join(line + "\n" for line in lead))
    out = subprocess.run([sys.executable, "-m", "kpeft.score", "task=cnndm", f"predictions={preds}",
                          f"task.data_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert 5 < scores["rouge2"] < 40 and 20 < scores["rouge1"] < 60


def test_unequal_aligned_files_are_an_error(make_cfg, tmp_path):
    (tmp_path / "val.source").write_text("a\nb\n")
    (tmp_path / "val.target").write_text("a\n")
    with pytest.raises(KpeftError, match="val.source has 2 lines but val.target 1"):
        cnndm(make_cfg, tmp_path).records("validation")


def test_hub_adapter(make_cfg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"article": "Art .", "highlights": "H1 .\nH2 .", "id": "abc"}]
    ds = datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in ("train", "validation", "test")})
    import kpeft.tasks.benchmark as benchmark

    monkeypatch.setattr(benchmark, "load_hub", lambda path, name, layout: ds)
    cfg = make_cfg("task=cnndm")
    task = task_class(cfg.task)(cfg.task)
    assert task.records("validation") == [{"id": "abc", "article": "Art .", "highlights": "H1 .\nH2 ."}]
    assert task.score(["H1 . <n> H2 ."])["rougeLsum"] == pytest.approx(100.0)


def test_lin_et_al_data_json_round_trips_the_stories(make_cfg, tmp_path):
    """Lin et al.'s ``data.json`` ({"train"|"val"|"test": [{"src", "tgt"}]}, the VGLM / Kernel-mix
    code's CNN/DM file) built from the fixture stories gives back their articles and highlights; a
    flat one-line ``tgt`` (sentences joined by spaces) gives the same summary text for ROUGE-2."""
    stories = cnndm(make_cfg, STORIES)
    train, val = stories.records("train"), stories.records("validation")
    pairs = {"train": [{"src": r["article"], "tgt": r["highlights"]} for r in train],
             "val": [{"src": r["article"], "tgt": r["highlights"], "distillated_tgt": "ignored"} for r in val],
             "test": [{"src": r["article"], "tgt": " ".join(r["highlights"].split("\n"))} for r in val[:3]]}
    (tmp_path / "data.json").write_text(json.dumps(pairs))
    task = cnndm(make_cfg, tmp_path)
    for split, source in (("train", train), ("validation", val)):
        got = task.records(split)
        # the same text; runs of spaces inside a highlight are collapsed (as for line-aligned files)
        assert [(r["article"], r["highlights"]) for r in got] == [(r["article"], sentences(r["highlights"])) for r in source]
        assert [r["id"] for r in got] == [f"{'val' if split == 'validation' else split}-{i}" for i in range(len(source))]
    flat = task.records("test")
    assert [r["highlights"] for r in flat] == [" ".join(r["highlights"].split()) for r in val[:3]]
    assert task.score([r["highlights"] for r in val[:3]])["rouge2_vglm"] == pytest.approx(100.0)
    # "valid" (the key Lin et al.'s loader renames "val" to) and another file name also work
    (tmp_path / "cnndm.json").write_text(json.dumps({"valid": pairs["val"][:2], "train": []}))
    cfg = make_cfg("task=cnndm", f"task.data_dir={tmp_path}", "task.options.json_file=cnndm.json")
    other = task_class(cfg.task)(cfg.task)
    assert [r["article"] for r in other.records("validation")] == [r["article"] for r in val[:2]]
    with pytest.raises(KpeftError, match="has no split test; it has: valid, train"):
        other.records("test")
    (tmp_path / "cnndm.json").write_text(json.dumps({"test": [{"src": ["tok", "ens"], "tgt": "x"}]}))
    with pytest.raises(KpeftError, match="item 0 of 'test' .* is not a"):
        task_class(cfg.task)(cfg.task).records("test")
