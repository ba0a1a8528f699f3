"""The E2E NLG Challenge task: loading the real dev and test files (MR and reference counts), the MR
parser, the CSV and hub adapters, the exact GPT-2 encoding, generation per MR, the score CLI round
trip, and a tiny end-to-end run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import FIXTURES, train_cli

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model, load_tokenizer
from kpeft.errors import KpeftError
from kpeft.methods import apply_method
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.tasks import IGNORE, task_class
from kpeft.tasks.e2e import pairs_from_hub, parse_mr, read_csv
from kpeft.train import adapt_to_task

DATA = FIXTURES / "e2e"
GPT2 = PACKAGED_TOKENIZERS["gpt2"]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs `java` (PTB tokenizer, METEOR)")


def e2e(make_cfg, *overrides, data_dir=DATA, tokenizer=False):
    model = ["model=tiny_gpt2", f"model.tokenizer={GPT2}"] if tokenizer else []
    cfg = make_cfg("task=e2e", f"task.data_dir={data_dir}", *model, *overrides)
    return cfg, task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model) if tokenizer else None)


def test_official_dev_and_test_counts(make_cfg):
    _, task = e2e(make_cfg)
    test = task.records("test")  # one record per MR: what a predictions file lists
    assert len(test) == 630 and sum(len(m["references"]) for m in test) == 4693
    assert min(len(m["references"]) for m in test) == 1 and max(len(m["references"]) for m in test) == 45
    assert test[0]["mr"] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert test[0]["references"] == ["A coffee shop in the city centre area called Blue Spice.",
                                     "Blue Spice is a coffee shop in city centre."]
    assert test[-1]["mr"] == "name[Zizzi], eatType[pub], near[The Sorrento]" and len(test[-1]["references"]) == 2
    dev = task.mrs("validation")
    assert len(dev) == 547 and sum(len(m["references"]) for m in dev) == 4672
    assert (min(len(m["references"]) for m in dev), max(len(m["references"]) for m in dev)) == (2, 43)
    assert len({m["mr"] for m in dev}) == 547  # consecutive groups = unique MRs, first-appearance order
    pairs = task.records("validation")  # training examples: one per (MR, reference) row
    assert len(pairs) == 4672 and set(pairs[0]) == {"id", "mr", "slots", "target"}
    assert pairs[0]["target"] == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert [p["target"] for p in pairs[:6]] == dev[0]["references"]
    assert len(task.loss_records("test")) == 4693 and task.generation_records("test") == test


def test_parse_mr():
    assert parse_mr("name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], priceRange[£20-25]") == [
        ["name", "The Eagle"], ["eatType", "coffee shop"], ["customer rating", "5 out of 5"], ["priceRange", "£20-25"]]
    assert parse_mr("name[Café Rouge],near[]") == [["name", "Café Rouge"], ["near", ""]]
    with pytest.raises(KpeftError, match="not a list of attribute\\[value\\]"):
        parse_mr("name: The Eagle")


def test_csv_reader_repairs_encodings_and_checks_the_layout(make_cfg, tmp_path):
    (tmp_path / "devset.csv").write_text('\ufeffmr,ref\n"name[A], priceRange[Â£20-25]",CafÃ© A costs Ł20.\n\n'
                                         '"name[A], priceRange[Â£20-25]","Second, quoted."\nname[B],B.\n', encoding="utf-8")
    assert read_csv(tmp_path / "devset.csv") == [("name[A], priceRange[£20-25]", "Café A costs £20."),
                                                 ("name[A], priceRange[£20-25]", "Second, quoted."), ("name[B]", "B.")]
    _, task = e2e(make_cfg, data_dir=tmp_path)
    assert [(m["mr"], len(m["references"])) for m in task.mrs("dev")] == [("name[A], priceRange[£20-25]", 2), ("name[B]", 1)]
    with pytest.raises(KpeftError, match="lacks trainset.csv; it should hold the E2E NLG Challenge CSVs"):
        task.records("train")
    (tmp_path / "bad.csv").write_text("meaning,text\nname[A],A.\n", encoding="utf-8")
    with pytest.raises(KpeftError, match="should start with the header 'mr,ref'"):
        read_csv(tmp_path / "bad.csv")
    # other file names (e.g. the cleaned E2E) through options
    _, task = e2e(make_cfg, "task.options.train_file=devset.csv", data_dir=tmp_path)
    assert len(task.records("train")) == 3


def test_hub_adapters_on_in_memory_datasets(make_cfg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = read_csv(DATA / "devset.csv")[:8]  # MR 1 (6 references) and MR 2 (first 2 of its references)
    hf = datasets.Dataset.from_list([{"meaning_representation": m, "human_reference": r} for m, r in rows])
    gem_train = datasets.Dataset.from_list([{"gem_id": f"t{i}", "meaning_representation": m, "target": r, "references": []}
                                            for i, (m, r) in enumerate(rows)])
    gem_test = datasets.Dataset.from_list([{"gem_id": "x0", "meaning_representation": rows[0][0], "target": rows[0][1],
                                            "references": [r for m, r in rows if m == rows[0][0]]}])
    assert pairs_from_hub({"meaning_representation": "name[A]", "human_reference": "A."}) == [("name[A]", "A.")]
    import kpeft.tasks.benchmark as benchmark

    asked = []
    hubs = {"e2e_nlg": datasets.DatasetDict({s: hf for s in ("train", "validation", "test")}),
            "GEM/e2e_nlg": datasets.DatasetDict({"train": gem_train, "validation": gem_train, "test": gem_test})}
    monkeypatch.setattr(benchmark, "load_hub", lambda path, name, layout: asked.append(path) or hubs[path])
    for hub_path, n_test_refs in (("e2e_nlg", [6, 2]), ("GEM/e2e_nlg", [6])):
        cfg = make_cfg("task=e2e", f"task.options.hub_path={hub_path}")
        task = task_class(cfg.task)(cfg.task)
        assert [e["target"] for e in task.records("train")] == [r for _, r in rows]
        assert [len(m["references"]) for m in task.records("test")] == n_test_refs
        assert task.records("test")[0]["slots"] == [["name", "Alimentum"], ["area", "city centre"], ["familyFriendly", "no"]]
    assert asked == ["e2e_nlg", "GEM/e2e_nlg"]


def test_exact_token_sequences(make_cfg):
    _, task = e2e(make_cfg, tokenizer=True)
    assert len(task.tokenizer) == 50257 + 6  # <pad> + the 5 E2E tokens
    bos, eos, attribute, value, target = 50258, 50259, 50260, 50261, 50262
    assert task.stop_ids == [bos, eos, attribute, value, target] and task.pad_token_id == 50257
    record = task.records("validation")[0]  # name[Alimentum], area[city centre], familyFriendly[no]
    ex = task.encode(record)
    # name | Al iment um | area | city ␣centre | family Friend ly | no
    prompt = [bos, attribute, 3672, value, 2348, 3681, 388, attribute, 20337, value, 19205, 7372,
              attribute, 17989, 23331, 306, value, 3919, target]
    text = [1858, 318, 257, 1295, 287, 262, 1748, 7372, 11, 978, 3681, 388, 11, 326, 318, 407, 1641, 12, 13120, 13]
    assert ex["input_ids"] == prompt + text + [eos]
    assert ex["token_type_ids"] == [bos] + [attribute] * 2 + [value] * 4 + [attribute] * 2 + [value] * 3 + \
        [attribute] * 4 + [value] * 2 + [target] * 22
    assert ex["labels"] == [IGNORE] * 19 + text + [eos]
    assert task.tokenizer.decode(text) == record["target"]
    assert task.prompt(record) == (prompt, ex["token_type_ids"][:19])
    # all 15 tokens of the Kernel-mix code first, then the 5 E2E tokens
    _, full = e2e(make_cfg, "task.options.all_special_tokens=true", tokenizer=True)
    assert len(full.tokenizer) == 50278 and full.stop_ids == list(range(50273, 50278))


def test_generation_one_output_per_mr(make_cfg, tmp_path):
    cfg, task = e2e(make_cfg, "method=lora", "budget=tiny", "task.options.max_eval_examples=3",
                    "task.options.max_new_tokens=3", "task.options.coco_metrics=false", tokenizer=True)
    model = load_model(cfg.model, "causal_lm", seed=0).eval()
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    adapt_to_task(adapted, task)
    metrics = task.evaluate_generation(adapted.model, "test", tmp_path, batch_size=2)
    assert set(metrics) == {"bleu", "nist"}
    rows = [json.loads(x) for x in (tmp_path / "generations" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["mr0", "mr1", "mr2"]
    assert [len(r["references"]) for r in rows] == [len(m["references"]) for m in task.records("test")[:3]]
    assert all(len(task.tokenizer.encode(r["prediction"])) <= 3 and "bleu" in r for r in rows)
    from kpeft.metrics import e2e as metric  # the in-loop numbers are the scorer's on the written rows

    assert metric.evaluate([r["prediction"] for r in rows], [r["references"] for r in rows], coco=False) == metrics


def _score(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpeft.score", *args], capture_output=True, text=True, timeout=900)


def _first_references(tmp_path, make_cfg):
    _, task = e2e(make_cfg)
    preds = tmp_path / "out.txt"
    preds.write_text("".join(m["references"][0] + "\n" for m in task.records("test")), encoding="utf-8")
    return preds


@needs_java
def test_score_cli_round_trip(tmp_path, make_cfg):
    """Outputs = each test MR's first reference: BLEU, ROUGE-L = 1; NIST and CIDEr as the official
    scorer printed them for this file (14.2365, 3.4021)."""
    preds = _first_references(tmp_path, make_cfg)
    out = _score("task=e2e", f"predictions={preds}", f"task.data_dir={DATA}", "task.options.meteor=off")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(scores) == {"bleu", "nist", "rouge_l", "cider"}
    assert scores["bleu"] == pytest.approx(1.0, abs=1e-12) and scores["rouge_l"] == pytest.approx(1.0, abs=1e-12)
    assert scores["nist"] == pytest.approx(14.236498836852, abs=1e-11)
    assert scores["cider"] == pytest.approx(3.4021384007557036, abs=1e-12)
    preds.write_text("only one line\n")
    out = _score("task=e2e", f"predictions={preds}", f"task.data_dir={DATA}")
    assert out.returncode == 2 and "1 predictions for the 630 MRs of split 'test'" in out.stderr


@pytest.mark.slow  # METEOR over the 630 test MRs: about a minute
@needs_java
def test_score_cli_round_trip_with_meteor(tmp_path, make_cfg):
    out = _score("task=e2e", f"predictions={_first_references(tmp_path, make_cfg)}", f"task.data_dir={DATA}")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: f"{v:.4f}" for k, v in scores.items()} == {
        "bleu": "1.0000", "nist": "14.2365", "meteor": "1.0000", "rouge_l": "1.0000", "cider": "3.4021"}


@pytest.mark.slow
@needs_java
def test_train_e2e_end_to_end(tmp_path):
    """kpeft.train on E2E with tiny sizes (the dev set as training file): train, generate once per
    MR, score officially (METEOR off), write the record and the generations."""
    run_dir, record, _ = train_cli(
        "model=tiny_gpt2", f"model.tokenizer={GPT2}", "task=e2e", f"task.data_dir={DATA}",
        "task.options.train_file=devset.csv", "task.options.max_train_examples=16", "task.options.max_eval_examples=4",
        "task.options.meteor=off", "task.options.max_new_tokens=5", "method=lora", "budget=tiny", "train.batch_size=8",
        "train.epochs=1", "train.warmup_steps=0", "train.eval_batch_size=4", root=tmp_path / "runs", timeout=900)
    test = record["metrics"]["test"]
    assert {"bleu", "nist", "rouge_l", "cider", "loss"} <= set(test) and record["score"] == test["bleu"]
    assert record["params"]["uncounted"] == (50263 - 256) * 32  # the tiny model's new wte rows
    rows = [json.loads(line) for line in (run_dir / "generations" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["mr0", "mr1", "mr2", "mr3"]
    assert all({"prediction", "references", "bleu", "rouge_l", "cider"} <= set(r) for r in rows)
