"""GLUE loaders on the real samples (every layout), both split protocols, the hub adapter, the
score CLI for every task, and the in-training metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import FIXTURES, mnli_folder

from kpeft.errors import KpeftError
from kpeft.metrics.glue import glue_metrics
from kpeft.tasks import task_class
from kpeft.tasks.glue import permutation

GLUE = FIXTURES / "glue"


def glue(make_cfg, name, data_dir, *overrides):
    cfg = make_cfg(f"task=glue_{name}", f"task.data_dir={data_dir}", *overrides)
    return task_class(cfg.task)(cfg.task)


@pytest.fixture
def folders(tmp_path):
    """GLUE folders built from the real samples (train = the 2,000-row subsets where there is one)."""
    out = {}
    for name, folder, train in (("sst2", "SST-2", "train_subset_2000.tsv"), ("cola", "CoLA", "train_subset_2000.tsv"),
                                ("stsb", "STS-B", None)):
        d = tmp_path / folder
        d.mkdir()
        shutil.copy(GLUE / folder / "dev.tsv", d / "dev.tsv")
        shutil.copy(GLUE / folder / (train or "dev.tsv"), d / "train.tsv")
        out[name] = d
    rte = tmp_path / "RTE"
    rte.mkdir()
    shutil.copy(GLUE / "RTE" / "val.jsonl", rte / "val.jsonl")
    shutil.copy(GLUE / "RTE" / "val.jsonl", rte / "train.jsonl")
    out["rte"] = rte
    out["mnli"] = mnli_folder(GLUE, tmp_path)  # GLUE's 16-column layout, from the 1,000-pair samples
    # MRPC from the raw Microsoft files; dev_ids = GLUE's own first 8 dev pairs + 2 more real ids
    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    shutil.copy(GLUE / "MRPC" / "msr_paraphrase_train.txt", mrpc / "msr_paraphrase_train.txt")
    ids = (GLUE / "format_samples" / "MRPC" / "dev_ids").read_text()
    (mrpc / "dev_ids.tsv").write_text(ids)
    out["mrpc"] = mrpc
    for name, folder in (("qnli", "QNLI"), ("qqp", "QQP")):
        d = tmp_path / folder
        d.mkdir()
        shutil.copy(GLUE / "format_samples" / folder / "dev.tsv", d / "dev.tsv")
        shutil.copy(GLUE / "format_samples" / folder / "dev.tsv", d / "train.tsv")
        out[name] = d
    return out


def test_real_dev_sets_load_with_their_layouts(make_cfg, folders):
    he = "task.options.protocol=he"
    sst2 = glue(make_cfg, "sst2", folders["sst2"], he).records("test")
    assert len(sst2) == 872 and sst2[0] == {"idx": 0, "text_a": "it 's a charming and often affecting journey . ",
                                             "text_b": None, "label": 1}
    cola = glue(make_cfg, "cola", folders["cola"], he).records("test")  # no header
    assert len(cola) == 527 and cola[0]["text_a"] == "The sailors rode the breeze clear of the rocks." and cola[0]["label"] == 1
    stsb = glue(make_cfg, "stsb", folders["stsb"], he).records("test")
    assert len(stsb) == 1500 and stsb[0]["label"] == 5.0 and stsb[1]["label"] == 4.75
    rte = glue(make_cfg, "rte", folders["rte"], he).records("test")
    assert len(rte) == 277 and rte[0]["label"] == 1 and rte[1]["label"] == 0  # not_entailment = 1
    mnli = glue(make_cfg, "mnli", folders["mnli"], he)
    test = mnli.records("test")
    assert len(test) == 2000 and [r["subset"] for r in test[999:1001]] == ["matched", "mismatched"]
    assert len(mnli.records("validation")) == 1000 and mnli.records("train")[0]["label"] == 1  # neutral
    mrpc = glue(make_cfg, "mrpc", folders["mrpc"], he)
    assert len(mrpc.records("test")) == 8 and len(mrpc.records("train")) == 1000 - 8  # the file's first 1,000 pairs
    assert glue(make_cfg, "qqp", folders["qqp"], he).records("test")[0]["text_b"] == "Why are hispanics so beautiful?"
    assert glue(make_cfg, "qnli", folders["qnli"], he).records("test")[1]["label"] == 1


def test_krona_protocol_small_task_halves_dev(make_cfg, folders):
    task = glue(make_cfg, "cola", folders["cola"])  # the YAML's protocol for CoLA
    val, test = task.records("validation"), task.records("test")
    assert (len(val), len(test)) == (263, 264)
    dev = [r["text_a"] for r in glue(make_cfg, "cola", folders["cola"], "task.options.protocol=he").records("test")]
    assert sorted(r["text_a"] for r in val + test) == sorted(dev)  # a partition of dev
    perm = permutation(527, 42)  # Compacter's torch.randperm
    assert sorted(perm) == list(range(527)) and perm == permutation(527, 42) != permutation(527, 1)
    other = glue(make_cfg, "cola", folders["cola"], "task.options.split_seed=1").records("validation")
    assert [r["text_a"] for r in other] != [r["text_a"] for r in val]


def test_krona_protocol_large_task_holds_out_1000_training_examples(make_cfg, folders):
    task = glue(make_cfg, "sst2", folders["sst2"], "task.options.protocol=krona")
    train, test, val = task.records("train"), task.records("test"), task.records("validation")
    assert (len(train), len(test), len(val)) == (1000, 1000, 872)  # [KA] App. D: the 1k held out = test
    assert not {r["text_a"] for r in train} & {r["text_a"] for r in test}
    swap = glue(make_cfg, "sst2", folders["sst2"], "task.options.protocol=krona", "task.options.krona_heldout=validation")
    assert (len(swap.records("validation")), len(swap.records("test"))) == (1000, 872)  # Compacter's code


def test_missing_files_name_the_layout(make_cfg, tmp_path):
    with pytest.raises(KpeftError, match=r"lacks train.tsv; it should hold GLUE's MNLI files train.tsv and dev_matched.tsv"):
        glue(make_cfg, "mnli", tmp_path, "task.options.protocol=he").records("test")
    with pytest.raises(KpeftError, match=r"lacks train.tsv; it should hold GLUE's MRPC files .*msr_paraphrase"):
        glue(make_cfg, "mrpc", tmp_path).records("train")


@pytest.mark.parametrize("name", ["sst2", "mnli", "cola", "rte", "mrpc", "stsb", "qnli", "qqp"])
def test_score_cli_for_every_task(name, folders, tmp_path):
    from omegaconf import OmegaConf

    from kpeft.compose import compose

    cfg = compose([f"task=glue_{name}", f"task.data_dir={folders[name]}"])
    records = task_class(cfg.task)(cfg.task).records("test")
    gold = [r["label"] for r in records]
    preds = list(gold)
    if name != "stsb":
        preds[0] = 1 - preds[0] if preds[0] in (0, 1) else 0  # one mistake
    else:
        preds = [g + (0.5 if i % 2 else 0.0) for i, g in enumerate(gold)]
    path = tmp_path / "preds.txt"
    path.write_text("".join(f"{p}\n" for p in preds))
    out = subprocess.run([sys.executable, "-m", "kpeft.score", f"task=glue_{name}", f"predictions={path}",
                          f"task.data_dir={folders[name]}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    subsets = [r.get("subset", "") for r in records] if name == "mnli" else None
    assert scores == pytest.approx(glue_metrics(name, preds, gold, subsets))
    assert OmegaConf.select(cfg, "task.metric") in scores  # the YAML's headline metric is reported


def test_label_names_are_accepted_as_predictions(make_cfg, folders):
    task = glue(make_cfg, "rte", folders["rte"], "task.options.protocol=he")
    names = ["entailment" if r["label"] == 0 else "not_entailment" for r in task.records("test")]
    assert task.score(names) == {"accuracy": 100.0}
    with pytest.raises(KpeftError, match="label 'maybe' is not one of"):
        task.score(["maybe"] * 277)


def test_hub_adapter(make_cfg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    row = {"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0}
    ds = datasets.DatasetDict({s: datasets.Dataset.from_list([row]) for s in ("train", "validation_matched", "validation_mismatched")})
    import kpeft.tasks.benchmark as benchmark

    monkeypatch.setattr(benchmark, "load_hub", lambda path, name, layout: ds)
    cfg = make_cfg("task=glue_mnli")
    task = task_class(cfg.task)(cfg.task)
    assert task.records("test") == [{"idx": 0, "text_a": "P.", "text_b": "H.", "label": 2, "subset": "matched"},
                                    {"idx": 1, "text_a": "P.", "text_b": "H.", "label": 2, "subset": "mismatched"}]
    assert task.score(["contradiction", "entailment"]) == {"mnli_m": 100.0, "mnli_mm": 0.0}


def test_in_training_metrics_equal_the_official_ones(make_cfg, folders):
    """batch_metrics/finalize (summable statistics, what the training loop reduces) = glue_metrics."""

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits[: input_ids.shape[0]]})()

    g = torch.Generator().manual_seed(0)
    for name, n_labels in (("cola", 2), ("mnli", 3), ("stsb", 1)):
        task = glue(make_cfg, name, folders[name], "task.options.protocol=he")
        labels = [r["label"] for r in task.records("test")][:64]
        examples = [{"input_ids": [1, 2], "label": y, **({"subset": i % 2} if name == "mnli" else {})}
                    for i, y in enumerate(labels)]
        logits = torch.randn(len(labels), n_labels, generator=g)
        stats = task.batch_metrics(Fixed(logits), task.collate(examples))
        ours = task.finalize(stats)
        if name == "stsb":
            assert ours["pearson"] == pytest.approx(glue_metrics("stsb", logits[:, 0].tolist(), labels)["pearson"], abs=1e-6)
        elif name == "mnli":
            subsets = ["mismatched" if i % 2 else "matched" for i in range(len(labels))]
            assert ours["mnli_m"] == pytest.approx(glue_metrics("mnli", logits.argmax(-1).tolist(), labels, subsets)["mnli_m"])
        else:
            official = glue_metrics("cola", logits.argmax(-1).tolist(), labels)
            assert ours["mcc"] == pytest.approx(official["mcc"])
