"""WebNLG loaders on the real challenge files (tests/fixtures/webnlg2017), the JSON layout, the hub adapter, and
the score CLI round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import FIXTURES

from kpeft.errors import KpeftError
from kpeft.tasks import task_class
from kpeft.tasks.webnlg import entries_from_json, entries_from_xml_dir, entry_from_hub, training_examples

DATA = FIXTURES / "webnlg2017"  # the full official test set; dev and train: some categories


def webnlg(make_cfg, *overrides, data_dir=DATA):
    cfg = make_cfg("task=webnlg", f"task.data_dir={data_dir}", *overrides)
    return task_class(cfg.task)(cfg.task)


def test_official_test_set_counts_and_order(make_cfg):
    entries = webnlg(make_cfg).records("test")
    assert len(entries) == 1862
    assert [e["eid"] for e in entries] == [f"Id{i}" for i in range(1, 1863)]  # official XML order
    assert sum(e["subset"] == "seen" for e in entries) == 971
    assert sum(e["subset"] == "unseen" for e in entries) == 891
    assert sum(len(e["references"]) < 3 for e in entries) == 583
    assert sum(len(e["references"]) for e in entries) == 4928
    first = entries[0]
    assert first["category"] == "Airport" and first["triples"] == [["Abilene_Regional_Airport", "cityServed", "Abilene,_Texas"]]
    assert first["references"][0] == "Abilene, Texas is served by the Abilene regional airport."


def test_dev_xml_and_prefix_tuning_json_give_the_same_entries(make_cfg):
    xml = entries_from_xml_dir(DATA / "dev")
    js = entries_from_json(DATA / "dev.json")
    assert len(xml) == len(js) == 187  # the Airport and University entries of the official dev set
    strip = lambda es: [(e["category"], e["size"], e["triples"], [(x["text"], x["comment"]) for x in e["lexes"]]) for e in es]  # noqa: E731
    assert strip(xml) == strip(js)
    # one training example per (entry, good lexicalisation): 485 lexicalisations, 2 "toFix"
    assert len(training_examples(xml)) == len(training_examples(js)) == 483
    assert len(webnlg(make_cfg).records("validation")) == 483


def test_train_subset_counts_and_comment_filter(make_cfg):
    task = webnlg(make_cfg)
    entries = task.entries("train")
    assert len(entries) == 285 and sum(len(e["lexes"]) for e in entries) == 1018  # Astronaut, Monument, University
    examples = task.records("train")
    bad = sum(lex["comment"] not in (None, "good") for e in entries for lex in e["lexes"])
    assert bad == 21 and len(examples) == 1018 - bad
    assert all(set(ex) == {"id", "eid", "category", "subset", "triples", "target"} for ex in examples[:5])
    assert {e["subset"] for e in entries} == {"seen"}


def test_json_layout_test_split_and_missing_files(make_cfg, tmp_path):
    (tmp_path / "test.json").write_text(json.dumps({"entries": [{"1": {
        "category": "Artist", "size": "1", "xml_id": "Id1",
        "modifiedtripleset": [{"subject": "A_B", "property": "genre", "object": "Jazz"}],
        "lexicalisations": [{"lex": "A B plays jazz.", "comment": "good", "xml_id": "Id1"}]}}]}))
    task = webnlg(make_cfg, data_dir=tmp_path)
    (entry,) = task.records("test")
    assert entry["subset"] == "unseen" and entry["triples"] == [["A_B", "genre", "Jazz"]]
    with pytest.raises(KpeftError, match=r"task.data_dir '.*' has neither train/<n>triples/\*\.xml nor train.json"):
        task.records("train")
    task.cfg.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(KpeftError, match="does not exist.*WebNLG 2017 challenge files"):
        task.records("validation")


def test_hub_adapter_on_an_in_memory_dataset(make_cfg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    row = {"category": "Politician", "size": 1, "eid": "Id7", "shape": "", "shape_type": "",
           "modified_triple_sets": {"mtriple_set": [["Joe | party | X_Party"]]},
           "lex": {"comment": ["good", "bad"], "lid": ["Id1", "Id2"], "text": ["Joe is in X.", "bad one"], "lang": ["", ""]}}
    ds = datasets.DatasetDict({s: datasets.Dataset.from_list([row]) for s in ("train", "dev", "test")})
    assert entry_from_hub(row, 0)["triples"] == [["Joe", "party", "X_Party"]]
    import kpeft.tasks.benchmark as benchmark

    monkeypatch.setattr(benchmark, "load_hub", lambda path, name, layout: ds)
    cfg = make_cfg("task=webnlg")
    task = task_class(cfg.task)(cfg.task)
    assert [e["target"] for e in task.records("train")] == ["Joe is in X."]
    (entry,) = task.records("test")
    assert entry["subset"] == "unseen" and entry["references"] == ["Joe is in X.", "bad one"]


def _score(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpeft.score", *args], capture_output=True, text=True, timeout=900)


def test_score_cli_round_trip_on_a_small_test_set(tmp_path):
    lex = lambda text: {"lex": text, "comment": "good", "xml_id": "Id1"}  # noqa: E731
    triple = [{"subject": "A", "property": "p", "object": "B"}]
    entries = [{"1": {"category": "Airport", "size": "1", "modifiedtripleset": triple,
                      "lexicalisations": [lex("A is near B."), lex("B is close to A.")]}},
               {"2": {"category": "Artist", "size": "1", "modifiedtripleset": triple,
                      "lexicalisations": [lex("The artist A plays B.")]}}]
    (tmp_path / "test.json").write_text(json.dumps({"entries": entries}))
    preds = tmp_path / "out.txt"
    preds.write_text("A is near B.\nThe artist A plays B\n", encoding="utf-8")
    out = _score("task=webnlg", f"predictions={preds}", f"task.data_dir={tmp_path}", "task.options.meteor=off")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(scores) == {f"{m}_{s}" for m in ("bleu", "ter") for s in ("seen", "unseen", "all")}
    # seen: an exact match; unseen: "the artist a plays b" vs "the artist a plays b ." — one deletion of 6
    assert scores["bleu_seen"] == pytest.approx(100.0) and scores["ter_seen"] == 0.0
    assert scores["ter_unseen"] == pytest.approx(1 / 6)
    preds.write_text("only one line\n")
    out = _score("task=webnlg", f"predictions={preds}", f"task.data_dir={tmp_path}", "task.options.meteor=off")
    assert out.returncode == 2 and "1 predictions for the 2 entries of split 'test'" in out.stderr


@pytest.mark.slow  # TER over the full test set: minutes
def test_score_cli_round_trip_on_the_official_test_set(tmp_path):
    from kpeft.tasks.webnlg import entries_from_xml

    entries = entries_from_xml(DATA / "test" / "testdata_with_lex.xml")
    preds = tmp_path / "out.txt"
    preds.write_text("".join(e["references"][0] + "\n" for e in entries), encoding="utf-8")
    out = _score("task=webnlg", f"predictions={preds}", f"task.data_dir={DATA}")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(scores) == {f"{m}_{s}" for m in ("bleu", "meteor", "ter") for s in ("seen", "unseen", "all")}
    assert scores["bleu_all"] > 90 and scores["meteor_all"] > 0.9 and scores["ter_all"] < 0.05
