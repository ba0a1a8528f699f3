"""The nlg_mini preset (conf/experiment/nlg_mini.yaml) end to end on a tiny Llama and a WebNLG-format
sample built here: the preset composes, dev moves into train by a deterministic stratified split,
the test set is a stratified subset, the zero-shot row evaluates without training, a PEFT row
trains, both write their generations, and ``python -m kpeft.score`` on a generations file gives the
run's recorded metrics. Also the `select_entries` options on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kpeft.errors import KpeftError
from kpeft.tasks.webnlg import select_entries, stratified_pick

SEEN, UNSEEN = ("Airport", "Food"), ("Artist", "Athlete")
WORDS = ["runway", "city", "river", "cheese", "band", "club", "red", "old", "north", "green"]


def _entry_xml(eid: int, category: str, size: int, lexes: int) -> str:
    triples = "".join(f"<mtriple>{category}_{eid}_{k} | prop{k} | {WORDS[(eid + k) % len(WORDS)]}</mtriple>"
                      for k in range(size))
    texts = "".join(f'<lex comment="good" lid="Id{j + 1}">The {category} {eid} has '
                    f'{" and ".join(WORDS[(eid + k + j) % len(WORDS)] for k in range(size))}.</lex>'
                    for j in range(lexes))
    return (f'<entry category="{category}" eid="Id{eid}" size="{size}"><modifiedtripleset>{triples}'
            f"</modifiedtripleset>{texts}</entry>")


def _write(path: Path, entries: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<benchmark><entries>{''.join(entries)}</entries></benchmark>", encoding="utf-8")


@pytest.fixture(scope="module")
def webnlg_dir(tmp_path_factory) -> Path:
    """The challenge layout: train 1–2 triples, dev 1–4 triples (4 entries per category and size),
    a test file with seen and unseen categories of sizes 1–3 (the challenge's eids Id1..)."""
    root = tmp_path_factory.mktemp("webnlg")
    eid = 0
    for split, sizes in (("train", (1, 2)), ("dev", (1, 2, 3, 4))):
        for size in sizes:
            for cat in SEEN:
                entries = []
                for _ in range(4):
                    eid += 1
                    entries.append(_entry_xml(eid, cat, size, 2))
                _write(root / split / f"{size}triples" / f"{size}triples_{cat}_{split}_challenge.xml", entries)
    test = [_entry_xml(i + 1, cat, 1 + i % 3, 1 + i % 3) for i, cat in enumerate((SEEN + UNSEEN) * 6)]
    _write(root / "test" / "testdata_with_lex.xml", test)
    return root


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE without merges (256 tokens: the tiny Llama's vocabulary) as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder = tmp_path_factory.mktemp("byte_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return folder


def test_dev_into_train_is_a_deterministic_stratified_split(make_cfg, webnlg_dir):
    from kpeft.tasks import task_class

    cfg = make_cfg("experiment=nlg_mini", f"task.data_dir={webnlg_dir}", "task.options.test_subset=12")
    task = task_class(cfg.task)(cfg.task)
    assert cfg.task.options.dev_into_train == 0.5
    train, val = task.entries("train"), task.entries("validation")
    dev = task._official_entries("validation")
    moved = [e for e in train if e["id"].startswith(tuple(f"{n}triples/" for n in range(1, 5)))
             and e["id"] in {d["id"] for d in dev}]
    # half of every (category, size) stratum of 4 dev entries moves; the rest stays for validation
    assert Counter((e["category"], e["size"]) for e in moved) == {(c, s): 2 for c in SEEN for s in (1, 2, 3, 4)}
    assert {e["id"] for e in moved} | {e["id"] for e in val} == {e["id"] for e in dev}
    assert len(train) == 16 + 16 and len(val) == 16
    assert max(e["size"] for e in train) == 4  # 3–4-triple inputs are seen in training
    # a pure function of (category, size, eid): the same pick again, and in official order
    again = select_entries(task._official_entries, "validation", {"dev_into_train": 0.5})
    assert [e["id"] for e in again] == [e["id"] for e in val]
    test = task.entries("test")
    assert Counter((e["subset"], e["size"]) for e in test) == {(s, n): 2 for s in ("seen", "unseen") for n in (1, 2, 3)}
    official = [e["id"] for e in task._official_entries("test")]
    assert [official.index(e["id"]) for e in test] == sorted(official.index(e["id"]) for e in test)


def test_stratified_pick_shares_and_errors():
    entries = [{"id": str(i), "eid": f"Id{i}", "category": "A" if i < 7 else "B", "size": 1} for i in range(10)]
    picked = stratified_pick(entries, 5, lambda e: e["category"])
    assert len(picked) == 5 and len({p for p in picked if int(p) < 7}) in (3, 4)
    assert stratified_pick(entries, 5, lambda e: e["category"]) == picked
    assert len(stratified_pick(entries, 0.5, lambda e: e["category"])) == 5
    with pytest.raises(KpeftError, match="dev_into_train=1.5 must be a fraction"):
        select_entries(lambda split: entries, "train", {"dev_into_train": 1.5})
    with pytest.raises(KpeftError, match="test_subset=-3 must be a number"):
        select_entries(lambda split: entries, "test", {"test_subset": -3})


def _score(generations: Path, *overrides: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kpeft.score", "task=webnlg", f"predictions={generations}", *overrides],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nlg_mini_preset_end_to_end_on_a_tiny_llama(tmp_path, webnlg_dir, byte_tokenizer):
    """The preset's own sweep (zero-shot and LoRA rows, seed 1) with tiny sizes, then the table and
    the scorer on the LoRA run's generations file."""
    tiny = ["model=tiny_llama", f"model.tokenizer={byte_tokenizer}", "model.architecture.max_position_embeddings=512",
            f"task.data_dir={webnlg_dir}", "task.options.test_subset=12", "task.options.max_new_tokens=6",
            "task.options.meteor=approx", "train.max_steps=3", "train.batch_size=4", "train.warmup_steps=0",
            "train.progress=false", f"output_root={tmp_path}"]
    proc = subprocess.run([sys.executable, "-m", "kpeft.train", "-m", "experiment=nlg_mini", "method=zero_shot,lora",
                           "seed=1", *tiny], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "nlg_mini" / "webnlg" / "tiny_llama"
    (zero_file,) = (runs / "zero_shot-smollm2").glob("seed1*/record.json")  # a -<hash> suffix: tiny overrides
    (lora_file,) = (runs / "lora-smollm2").glob("seed1*/record.json")
    zero, lora = json.loads(zero_file.read_text()), json.loads(lora_file.read_text())
    assert zero["status"] == lora["status"] == "complete"
    assert zero["training"]["steps"] == 0 and zero["params"]["trainable"] == 0
    assert lora["training"]["steps"] == 3 and lora["params"]["trainable"] > 0
    assert lora["config"]["train"]["lr"] == 2.0e-3 and zero["config"]["train"]["eval_only"] is True
    for record in (zero, lora):
        rows = [json.loads(line) for line in (Path(record["run_dir"]) / "generations" / "test.jsonl").open()]
        assert len(rows) == 12 and Counter(r["subset"] for r in rows) == {"seen": 6, "unseen": 6}
        assert {"bleu_all", "bleu_seen", "bleu_unseen", "meteor_approx_all", "ter_all"} <= set(record["metrics"]["test"])
    generations = Path(lora["run_dir"]) / "generations" / "test.jsonl"
    scored = _score(generations, "experiment=nlg_mini", f"task.data_dir={webnlg_dir}", "task.options.test_subset=12",
                    "task.options.meteor=approx")
    test = lora["metrics"]["test"]
    # kpeft.score goes through the function the run's evaluation used: the record's own keys and numbers
    assert {"bleu_all", "ter_unseen", "meteor_approx_all"} <= set(scored)
    assert scored == {key: test[key] for key in scored}
    table = subprocess.run([sys.executable, "-m", "kpeft.tables", "experiment=nlg_mini", f"output_root={tmp_path}",
                            "model=tiny_llama", "--out", str(tmp_path / "tables")], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "Zero-shot" in table.stdout and "LoRA-8" in table.stdout


COMMITTED = sorted((Path(__file__).resolve().parent.parent / "results" / "runs" / "nlg_mini").glob("**/record.json"))


@pytest.mark.parametrize("record_path", COMMITTED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_committed_generations_rescore_to_their_record(record_path):
    """Every committed nlg_mini record's BLEU and TER come back from its generations file alone
    (references and seen/unseen are stored per entry); METEOR is checked by `kpeft.score` in the docs."""
    from kpeft.metrics.webnlg import UNSEEN_CATEGORIES, evaluate

    record = json.loads(record_path.read_text())
    rows = [json.loads(line) for line in (record_path.parent / "generations" / "test.jsonl").open()]
    unseen = sorted(UNSEEN_CATEGORIES)[0]  # any unseen category name: evaluate() only needs seen vs unseen
    scores = evaluate([r["prediction"] for r in rows], [r["references"] for r in rows],
                      [unseen if r["subset"] == "unseen" else "Airport" for r in rows], meteor="off")
    recorded = record["metrics"]["test"]
    for metric in ("bleu", "ter"):
        for subset in ("seen", "unseen", "all"):
            assert scores[metric][subset] == pytest.approx(recorded[f"{metric}_{subset}"], abs=1e-9)
