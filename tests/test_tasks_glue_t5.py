"""GLUE as text-to-text for T5 (kpeft/tasks/text2text.py): T5's label words round-trip, T5's exact
input strings, the KronA split sizes on the real samples through the T5 path, the official metrics
of decoded strings (invalid ones included), and the KronA recipe end to end on tiny_t5."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES, mnli_folder, train_cli

from kpeft.backbones.loading import load_tokenizer
from kpeft.errors import KpeftError
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.tasks import task_class
from kpeft.tasks.glue import Glue
from kpeft.tasks.text2text import (
    LABEL_WORDS,
    GlueText2Text,
    output_values,
    parse_output,
    source_text,
    stsb_text,
    target_text,
    target_vocabulary,
    text2text_metrics,
)

GLUE = FIXTURES / "glue"
T5_TOKENIZER = PACKAGED_TOKENIZERS["t5"]
TASKS = ("sst2", "cola", "mnli", "rte", "qnli", "mrpc", "qqp", "stsb")
T5 = ("model=tiny_t5", f"model.tokenizer={T5_TOKENIZER}")


@pytest.fixture
def folders(tmp_path):
    """GLUE task folders built from the real samples (train = the 2,000-row subsets, or dev)."""
    layout = {"CoLA": {"dev.tsv": "CoLA/dev.tsv", "train.tsv": "CoLA/train_subset_2000.tsv"},
              "SST-2": {"dev.tsv": "SST-2/dev.tsv", "train.tsv": "SST-2/train_subset_2000.tsv"},
              "STS-B": {"dev.tsv": "STS-B/dev.tsv", "train.tsv": "STS-B/dev.tsv"},
              "RTE": {"val.jsonl": "RTE/val.jsonl", "train.jsonl": "RTE/val.jsonl"},
              "MRPC": {"msr_paraphrase_train.txt": "MRPC/msr_paraphrase_train.txt",
                       "dev_ids.tsv": "format_samples/MRPC/dev_ids"}}
    for folder, files in layout.items():
        (tmp_path / folder).mkdir()
        for dst, src in files.items():
            shutil.copy(GLUE / src, tmp_path / folder / dst)
    return tmp_path


def t5_task(make_cfg, name, data_dir=None, *overrides):
    cfg = make_cfg(*T5, f"task=glue_{name}", *([f"task.data_dir={data_dir}"] if data_dir else []), *overrides)
    return task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model))


# ---------------------------------------------------------------- format
def test_label_words_round_trip_for_every_task():
    for task in TASKS:
        if task == "stsb":
            continue
        for label, word in enumerate(LABEL_WORDS[task]):
            assert target_text(task, label) == word and parse_output(task, word) == label
            assert parse_output(task, f" {word} ") == label  # surrounding space is not part of it
            assert parse_output(task, target_text(task, label, "indices"), "indices") == label
        assert parse_output(task, word.upper()) is None and parse_output(task, "") is None
    assert LABEL_WORDS["mnli"] == ("entailment", "neutral", "contradiction")
    assert LABEL_WORDS["qqp"] == ("not_duplicate", "duplicate") and LABEL_WORDS["cola"][1] == "acceptable"
    # STS-B: rounded to the nearest 0.2, half to even as tf.round (2.5 → 2, 7.5 → 8), one decimal.
    assert [stsb_text(y) for y in (3.8, 4.75, 0.5, 1.5, 5.0, 0.0, 2.36)] == \
        ["3.8", "4.8", "0.4", "1.6", "5.0", "0.0", "2.4"]
    vocab = target_vocabulary("stsb")
    assert len(vocab) == 26 and vocab[:3] == ["0.0", "0.2", "0.4"] and vocab[-1] == "5.0"
    assert [parse_output("stsb", t) for t in vocab] == pytest.approx([i / 5 for i in range(26)])
    assert parse_output("stsb", "nan") is None and parse_output("stsb", "3.8.") is None


def test_label_words_survive_the_t5_tokenizer(make_cfg):
    tok = load_tokenizer(make_cfg(*T5).model)
    for task in TASKS:
        for word in target_vocabulary(task):
            ids = tok(word)["input_ids"]
            assert ids[-1] == tok.eos_token_id
            decoded = tok.decode(ids, skip_special_tokens=True).strip()
            assert decoded == word and parse_output(task, decoded) is not None


def test_exact_input_strings():
    rec = {"text_a": "A.", "text_b": "B?"}
    assert {task: source_text(task, rec) for task in TASKS} == {
        "sst2": "sst2 sentence: A.",
        "cola": "cola sentence: A.",
        "mnli": "mnli hypothesis: B? premise: A.",  # text_a is MNLI's premise (T5: sorted field names)
        "rte": "rte sentence1: A. sentence2: B?",
        "qnli": "qnli question: A. sentence: B?",
        "mrpc": "mrpc sentence1: A. sentence2: B?",
        "qqp": "qqp question1: A. question2: B?",
        "stsb": "stsb sentence1: A. sentence2: B?",
    }


def test_real_examples_are_encoded_in_t5_format(make_cfg, folders):
    sst2 = t5_task(make_cfg, "sst2", folders / "SST-2", "task.options.protocol=he")
    first = sst2.records("test")[0]
    assert source_text("sst2", first) == "sst2 sentence: it 's a charming and often affecting journey . "
    enc = sst2.encode([first])[0]
    tok = sst2.tokenizer
    assert enc["input_ids"] == tok("sst2 sentence: it 's a charming and often affecting journey . ")["input_ids"]
    assert tok.decode(enc["labels"], skip_special_tokens=True) == "positive"
    cola = t5_task(make_cfg, "cola", folders / "CoLA", "task.options.protocol=he").records("test")[0]
    assert source_text("cola", cola) == "cola sentence: The sailors rode the breeze clear of the rocks."
    stsb = t5_task(make_cfg, "stsb", folders / "STS-B", "task.options.protocol=he")
    second = stsb.records("test")[1]  # score 4.75 → "4.8"
    assert tok.decode(stsb.encode([second])[0]["labels"], skip_special_tokens=True) == "4.8"
    truncated = t5_task(make_cfg, "stsb", folders / "STS-B", "task.max_length=8").encode(stsb.records("test")[:1])
    assert len(truncated[0]["input_ids"]) == 8 and truncated[0]["input_ids"][-1] == tok.eos_token_id


# ---------------------------------------------------------------- the T5 path and the split protocol
def test_format_follows_the_backbone(make_cfg):
    assert task_class(make_cfg(*T5, "task=glue_mnli").task) is GlueText2Text
    assert task_class(make_cfg("model=tiny_roberta", "task=glue_mnli").task) is Glue
    assert task_class(make_cfg("model=tiny_roberta", "task=glue_mnli", "task.options.format=text2text").task) is GlueText2Text
    assert task_class(make_cfg(*T5, "task=glue_rte", "task.options.format=classification").task) is Glue
    cfg = make_cfg("model=t5_base", "method=krona", "task=glue_mnli")  # the documented path
    task = task_class(cfg.task)(cfg.task)
    assert (task.kind, task.head) == ("seq2seq", "seq2seq")
    with pytest.raises(KpeftError, match="task.options.format must be auto, classification or text2text"):
        task_class(make_cfg("task=glue_rte", "task.options.format=t5").task)


def test_krona_split_sizes_on_the_real_samples(make_cfg, folders):
    """KronA / Compacter splits through the T5 path: small tasks halve dev (seeded torch.randperm),
    large ones hold out 1,000 training examples as test: the classifier's splits, encoded."""
    expected = {("cola", "CoLA"): (2000, 263, 264), ("rte", "RTE"): (277, 138, 139),
                ("stsb", "STS-B"): (1500, 750, 750), ("mrpc", "MRPC"): (992, 4, 4),
                ("sst2", "SST-2"): (1000, 872, 1000)}
    for (name, folder), sizes in expected.items():
        overrides = (f"task=glue_{name}", f"task.data_dir={folders / folder}", "task.options.protocol=krona")
        task = t5_task(make_cfg, name, folders / folder, "task.options.protocol=krona")
        assert isinstance(task, GlueText2Text)
        assert tuple(len(task.records(s)) for s in ("train", "validation", "test")) == sizes, name
        plain = task_class(make_cfg(*overrides).task)(make_cfg(*overrides).task)
        assert type(plain) is Glue and task.records("test") == plain.records("test")  # the classifier's split
    rte = t5_task(make_cfg, "rte", folders / "RTE").load_splits()  # RTE's YAML protocol is krona
    assert tuple(len(rte[s]) for s in ("train", "validation", "test")) == (277, 138, 139)
    assert all(e["input_ids"][-1] == e["labels"][-1] == 1 for e in rte["test"])  # </s> on both sides
    capped = t5_task(make_cfg, "cola", folders / "CoLA", "task.options.max_train_examples=5",
                     "task.options.max_eval_examples=3").load_splits()
    assert [len(capped[s]) for s in ("train", "validation", "test")] == [5, 3, 3]


# ---------------------------------------------------------------- metrics of decoded strings
def test_metrics_of_decoded_strings_with_invalid_outputs():
    # MRPC: an invalid output becomes the opposite of the gold label (T5's f1_score_with_invalid).
    preds, valid = output_values("mrpc", ["equivalent", "equivalent", "banana", "not_equivalent"], [1, 0, 1, 0])
    assert preds == [1, 1, 0, 0] and valid == [True, True, False, True]
    assert text2text_metrics("mrpc", preds, [1, 0, 1, 0]) == {"f1": 50.0, "accuracy": 50.0}  # tp 1, fp 1, fn 1
    # CoLA: invalid → −1, one more class for Matthews' correlation (sklearn's multi-class formula):
    # n 5, correct 3, true counts (−1, 0, 1) = (0, 2, 3), predicted (1, 2, 2) → (15 − 10) / √(16 · 12).
    preds, valid = output_values("cola", ["acceptable", "unacceptable", "unacceptable", "acceptable!", "acceptable"],
                                 [1, 1, 0, 0, 1])
    assert preds == [1, 0, 0, -1, 1] and valid.count(False) == 1
    assert text2text_metrics("cola", preds, [1, 1, 0, 0, 1])["mcc"] == pytest.approx(100 * 5 / math.sqrt(192))
    # STS-B: a non-number → −1.0; Pearson = numpy's; Spearman by hand (rank differences 0, 1, 1, 0).
    labels = [4.0, 2.0, 1.2, 3.0]
    preds, valid = output_values("stsb", ["3.8", "two", "1.0", "3.2"], labels)
    assert preds == [3.8, -1.0, 1.0, 3.2] and valid == [True, False, True, True]
    scores = text2text_metrics("stsb", preds, labels)
    assert scores["pearson"] == pytest.approx(100 * np.corrcoef(preds, labels)[0, 1])
    assert scores["spearman"] == pytest.approx(100 * (1 - 6 * 2 / (4 * (16 - 1))))
    assert text2text_metrics("stsb", [2.0] * 4, labels) == {"pearson": 0.0, "spearman": 0.0}  # constant: 0, not NaN
    # MNLI: accuracy over the split, matched / mismatched where the split says which.
    preds, _ = output_values("mnli", ["entailment", "neutral", "neutral", "maybe"], [0, 1, 2, 0])
    assert preds == [0, 1, 1, -1]
    assert text2text_metrics("mnli", preds, [0, 1, 2, 0], ["matched", "matched", "mismatched", "mismatched"]) == \
        {"accuracy": 50.0, "mnli_m": 100.0, "mnli_mm": 0.0}
    assert text2text_metrics("mnli", preds, [0, 1, 2, 0], ["", "", "", ""]) == {"accuracy": 50.0}


def test_score_accepts_t5_outputs(make_cfg, folders):
    task = t5_task(make_cfg, "rte", folders / "RTE", "task.options.protocol=he")
    words = [LABEL_WORDS["rte"][r["label"]] for r in task.records("test")]
    assert task.score(words) == {"accuracy": 100.0}
    assert task.score([str(r["label"]) for r in task.records("test")]) == {"accuracy": 100.0}
    with pytest.raises(KpeftError, match="label 'maybe' is not one of"):
        task.score(["maybe"] * len(words))


# ---------------------------------------------------------------- the KronA recipe (conf/experiment/krona_glue.yaml)
def test_krona_recipe_per_task_values(make_cfg):
    """Tables 16-18 reach each run through method_train / method_overrides / task_overrides."""
    from kpeft.count import count_parameters

    def run_cfg(method, task, *extra):
        return make_cfg("experiment=krona_glue", f"method={method}", f"task={task}", *extra)

    mnli = run_cfg("krona", "glue_mnli")
    comp = mnli.method.components.krona
    assert (list(comp.a_shape), list(comp.b_shape), mnli.train.lr) == ([2, 384], [384, 2], 1.0e-3)
    assert (mnli.model.name, mnli.budget.name, mnli.task.metric) == ("t5_base", "t5_glue", "accuracy")
    assert (mnli.train.batch_size, mnli.train.epochs, mnli.train.warmup_steps, mnli.task.max_length) == (100, 20, 500, 128)
    assert (mnli.task.options.protocol, mnli.task.options.format, mnli.task.options.size) == ("krona", "text2text", "large")
    assert count_parameters(mnli).trainable == 158_208  # (2,384)/(384,2) costs 1,536 per matrix too
    qnli = run_cfg("krona", "glue_qnli").method.components.krona
    assert (list(qnli.a_shape), list(qnli.b_shape)) == ([3, 256], [256, 3])
    cola = run_cfg("krona", "glue_cola")
    assert list(cola.method.components.krona.a_shape) == [32, 24] and cola.task.metric == "mcc"
    assert run_cfg("krona", "glue_rte").train.lr == 2.0e-3
    kb = run_cfg("krona_b", "glue_mnli").method.components.krona_b
    assert (kb.scale, kb.n_bias) == (4, 2)
    res = run_cfg("krona_b_res", "glue_stsb")
    assert (res.method.components.krona_b_res.scale, res.method.components.krona_b_res.n_bias, res.train.lr) == (16, 1, 9.0e-4)
    assert [run_cfg("parallel_adapter", t).train.lr for t in ("glue_cola", "glue_mrpc", "glue_qqp")] == [3.0e-3, 5.0e-3, 1.0e-3]
    lora = run_cfg("lora", "glue_sst2")
    assert (lora.method.components.lora.alpha, lora.method.components.lora.r, lora.train.lr) == (1.0, 1, 1.0e-3)
    assert (run_cfg("finetune", "glue_qqp").train.lr, run_cfg("compacter", "glue_qqp").train.lr) == (3.0e-4, 3.0e-3)
    with pytest.raises(KpeftError, match="method_overrides.krona: .*scal"):
        run_cfg("krona", "glue_rte", "+method_overrides.krona.components.krona.scal=2")


# ---------------------------------------------------------------- end to end
def test_krona_recipe_trains_and_scores_tiny_t5_end_to_end(make_cfg, folders, tmp_path):
    """experiment=krona_glue on tiny_t5 (T5's vocabulary) with KronA on RTE: trains, generates,
    scores, and writes one prediction row per test example whose values give the record's metrics."""
    from kpeft.train import run

    cfg = make_cfg(
        "experiment=krona_glue", *T5, "model.architecture.vocab_size=32128", "method=krona",
        "budget.krona.a_shape=[4,8]", "budget.krona.b_shape=[8,4]", "task=glue_rte",
        f"task.data_dir={folders / 'RTE'}", "task.options.max_train_examples=16", "task.options.max_eval_examples=6",
        "train.batch_size=8", "train.epochs=1", "train.warmup_steps=0", "train.eval_batch_size=4", "seed=1",
    )
    assert cfg.train.lr == 2.0e-3 and cfg.task.options.protocol == "krona"  # Table 16's RTE lr, the KronA split
    record = run(cfg)
    assert record["status"] == "complete" and record["metric"] == "accuracy"
    test = record["metrics"]["test"]
    assert set(test) == {"accuracy", "invalid", "loss"} and record["score"] == test["accuracy"]
    run_dir = Path(record["run_dir"])
    assert run_dir.parent == tmp_path / "runs" / "krona_glue" / "glue_rte" / "tiny_t5" / "krona-t5_glue"
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    task = task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model))
    gold = [r["label"] for r in task.records("test")[:6]]
    assert [r["index"] for r in rows] == list(range(6)) and [r["label"] for r in rows] == gold
    for row in rows:
        assert set(row) == {"index", "prediction", "label", "score", "output"}
        value = parse_output("rte", row["output"])
        assert row["prediction"] == (value if value is not None else -1)
        assert row["score"] == float(row["prediction"] == row["label"])
    assert test["accuracy"] == pytest.approx(100 * sum(r["score"] for r in rows) / 6)
    assert test["invalid"] == pytest.approx(100 * sum(parse_output("rte", r["output"]) is None for r in rows) / 6)


# ---------------------------------------------------------------- the run path
def test_krona_on_t5_needs_no_budget_argument(make_cfg):
    """`model=t5_base method=krona task=glue_mnli` composes at KronA's own budget (t5_glue, 0.07%)."""
    from kpeft.count import count_parameters

    cfg = make_cfg("model=t5_base", "method=krona", "task=glue_mnli")
    assert (cfg.budget.name, list(cfg.method.components.krona.a_shape)) == ("t5_glue", [32, 24])
    assert count_parameters(cfg).trainable == 158_208


def test_krona_mnli_run_path_without_a_budget_on_tiny_t5(make_cfg, tmp_path):
    """The issue's command on tiny_t5 (T5's vocabulary) and the MNLI samples: text-to-text,
    He et al.'s split (dev as test, matched and mismatched), a complete record with both accuracies."""
    from kpeft.train import run

    cfg = make_cfg(*T5, "model.architecture.vocab_size=32128", "method=krona", "task=glue_mnli",
                   "budget.krona.a_shape=[4,8]", "budget.krona.b_shape=[8,4]", f"task.data_dir={mnli_folder(GLUE, tmp_path)}",
                   "task.options.max_train_examples=8", "task.options.max_eval_examples=6", "train.batch_size=4",
                   "train.epochs=1", "train.eval_batch_size=6", "seed=1")
    assert cfg.budget.name == "t5_glue" and cfg.task.options.protocol == "he"
    record = run(cfg)
    assert record["status"] == "complete" and record["metric"] == "mnli_mm"
    assert record["config"]["budget"]["name"] == "t5_glue"
    assert {"accuracy", "mnli_m", "mnli_mm", "invalid"} <= set(record["metrics"]["test"])
    assert record["score"] == record["metrics"]["test"]["mnli_mm"]


def test_krona_mnli_command_on_t5_base_random_init(tmp_path):
    """`python -m kpeft.train model=t5_base method=krona task=glue_mnli`, offline: T5-base's
    architecture without weights, the packaged T5 tokenizer (no model.tokenizer: the hub is
    unreachable) and the MNLI samples, two steps (~15 s)."""
    run_dir, record, stdout = train_cli(
        "model=t5_base", "method=krona", "task=glue_mnli", "model.init=random",
        f"task.data_dir={mnli_folder(GLUE, tmp_path)}", "task.options.max_train_examples=8",
        "task.options.max_eval_examples=4", "task.options.max_new_tokens=3", "train.batch_size=4", "train.epochs=1",
        "train.eval_batch_size=4", root=tmp_path / "runs", timeout=1200)
    assert run_dir.parent == tmp_path / "runs" / "default" / "glue_mnli" / "t5_base" / "krona-t5_glue"
    assert run_dir.name.startswith("seed123-")  # the sample-size overrides give the run its own directory
    assert f"→  {run_dir / 'record.json'}" in stdout.splitlines()[-1]
    assert record["status"] == "complete" and record["params"]["trainable"] == 158_208
    assert set(record["metrics"]["test"]) >= {"accuracy", "mnli_m", "mnli_mm", "invalid"}
