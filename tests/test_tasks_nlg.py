"""The GPT-2 encoding of the NLG benchmarks ([KM] App. B.1, Table B.4), the task embeddings'
training and counting ([KM] App. B.1, footnote 11; [KM] Table B.4), and generation-based evaluation end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIXTURES, coqa_folder, train_cli

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model, load_tokenizer
from kpeft.methods import apply_method
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.tasks import IGNORE, task_class
from kpeft.tasks.nlg import ALL_SPECIAL_TOKENS, build_example
from kpeft.train import adapt_to_task

GPT2 = PACKAGED_TOKENIZERS["gpt2"]
WEBNLG, COQA, CNNDM = FIXTURES / "webnlg2017", FIXTURES / "coqa", FIXTURES / "cnn_dm" / "stories"


def nlg_task(make_cfg, name, data_dir, *overrides):
    cfg = make_cfg("model=tiny_gpt2", f"model.tokenizer={GPT2}", f"task={name}", f"task.data_dir={data_dir}", *overrides)
    return cfg, task_class(cfg.task)(cfg.task, load_tokenizer(cfg.model))


@pytest.fixture
def coqa_dir(tmp_path):
    return coqa_folder(COQA, tmp_path)


def check_loss_mask(task, record, example):
    """Scored labels = the target's own tokens + eos; everything before is −100."""
    target = task.ids(task.target_of(record)) if task.name != "cnndm" else \
        task.ids(task.target_of(record))[: int(task.options.max_target_tokens)]
    scored = [x for x in example["labels"] if x != IGNORE]
    assert scored == target + [task.stop_ids[1]]
    n = len(scored)
    assert example["labels"][-n:] == example["input_ids"][-n:]
    assert all(x == IGNORE for x in example["labels"][:-n])
    assert len(example["input_ids"]) == len(example["token_type_ids"]) == len(example["labels"])


def test_build_example_segments():
    ex = build_example([(7, [7]), (8, [8, 1, 2]), (9, [9, 3, 4, 5])])
    assert ex == {"input_ids": [7, 8, 1, 2, 9, 3, 4, 5], "token_type_ids": [7, 8, 8, 8, 9, 9, 9, 9],
                  "labels": [IGNORE] * 5 + [3, 4, 5]}


def test_all_special_tokens_vocabulary_of_the_code(make_cfg):
    _, task = nlg_task(make_cfg, "webnlg", WEBNLG, "task.options.all_special_tokens=true")
    tok = task.tokenizer
    assert len(tok) == 50273 and task.pad_token_id == tok.convert_tokens_to_ids("<pad>") == 50257
    assert [tok.convert_tokens_to_ids(t) for t in ALL_SPECIAL_TOKENS] == list(range(50258, 50273))
    assert task.sid("<bos_webnlg>") == 50267 and task.stop_ids == list(range(50267, 50273))


def test_webnlg_exact_sequences(make_cfg):
    _, task = nlg_task(make_cfg, "webnlg", WEBNLG)
    assert len(task.tokenizer) == 50257 + 7  # <pad> + the 6 WebNLG tokens
    bos, eos, subj, prop, obj, tgt = 50258, 50259, 50260, 50261, 50262, 50263
    record = task.records("validation")[0]
    assert record["triples"] == [["Aarhus", "leaderName", "Jacob_Bundsgaard"]]
    assert record["target"] == "The leader of Aarhus is Jacob Bundsgaard."
    ex = task.encode(record)
    # "Aarhus" = A ar hus; "leaderName" = leader Name; "Jacob_Bundsgaard" = Jacob _ B und s gaard
    assert ex["input_ids"] == [bos, subj, 32, 283, 7537, prop, 27940, 5376, obj, 46751, 62, 33, 917, 82, 36232,
                               tgt, 464, 3554, 286, 317, 283, 7537, 318, 12806, 13319, 82, 36232, 13, eos]
    assert ex["token_type_ids"] == [bos] + [subj] * 4 + [prop] * 3 + [obj] * 7 + [tgt] * 14
    assert ex["labels"] == [IGNORE] * 16 + [464, 3554, 286, 317, 283, 7537, 318, 12806, 13319, 82, 36232, 13, eos]
    assert task.tokenizer.decode(ex["input_ids"][16:-1]) == record["target"]
    for r in task.records("validation")[:20]:
        check_loss_mask(task, r, task.encode(r))
    ids, types = task.prompt(record)
    assert ids == ex["input_ids"][:16] and types == ex["token_type_ids"][:16]
    # multi-triple entries: one (subject, property, object) group per triple, in order
    multi = next(r for r in task.records("validation") if len(r["triples"]) == 3)
    ex = task.encode(multi)
    assert [t for t in ex["input_ids"] if t in (subj, prop, obj)] == [subj, prop, obj] * 3


def test_coqa_exact_sequences(make_cfg, coqa_dir):
    _, task = nlg_task(make_cfg, "coqa", coqa_dir, "task.options.n_validation=0", "task.options.max_document_tokens=12")
    bos, eos, question, answer, document = 50258, 50259, 50260, 50261, 50262
    record = task.records("test")[2]  # third turn: history = q1 a1 q2 a2 q3
    assert record["history"] == ["What color was Cotton?", "white", "Where did she live?", "in a barn",
                                 "Did she live alone?"]
    assert record["answer"] == "no" and record["story"].startswith("Once upon a time, in a barn near a farm house,")
    ex = task.encode(record)
    doc = [7454, 2402, 257, 640, 11, 287, 257, 25203, 1474, 257, 5318, 2156]  # "Once upon a time, in a barn near a farm house"
    q1, a1, q2, a2, q3 = [2061, 3124, 373, 23915, 30], [11186], [8496, 750, 673, 2107, 30], [259, 257, 25203], \
        [11633, 673, 2107, 3436, 30]
    assert ex["input_ids"] == [bos, document, *doc, question, *q1, answer, *a1, question, *q2, answer, *a2,
                               question, *q3, answer, 3919, eos]
    assert ex["token_type_ids"] == [document] * 14 + [question] * 6 + [answer] * 2 + [question] * 6 + \
        [answer] * 4 + [question] * 6 + [answer] * 3
    assert ex["labels"] == [IGNORE] * 39 + [3919, eos]
    for r in task.records("test")[:10]:
        check_loss_mask(task, r, task.encode(r))
    # the default max_history = 2 keeps 5 utterances; the document is cut at 400 tokens by default
    _, full = nlg_task(make_cfg, "coqa", coqa_dir, "task.options.n_validation=0")
    late = full.records("test")[9]
    assert len(late["history"]) == 5
    ex = full.encode(late)
    assert ex["token_type_ids"].count(document) == 2 + min(400, len(full.ids(late["story"])))


def test_cnndm_exact_sequences_and_dropped_pairs(make_cfg):
    _, task = nlg_task(make_cfg, "cnndm", CNNDM, "task.options.max_source_tokens=10", "task.options.max_target_tokens=8")
    bos, eos, source, target = 50258, 50259, 50260, 50261
    record = task.records("train")[0]
    assert record["article"].startswith("WASHINGTON (CNN) -- As he awaits a crucial progress report on Iraq,")
    assert record["highlights"].startswith("President Bush to address the Veterans of Foreign Wars on Wednesday .\n")
    ex = task.encode(record)
    src = [21793, 357, 18474, 8, 1377, 1081, 339, 37180, 257, 8780]  # "WASHINGTON (CNN) -- As he awaits a crucial"
    tgt = [10364, 5511, 284, 2209, 262, 18950, 286, 8708]  # "President Bush to address the Veterans of Foreign"
    assert ex["input_ids"] == [bos, source, *src, target, *tgt, eos]
    assert ex["token_type_ids"] == [bos] + [source] * 11 + [target] * 10
    assert ex["labels"] == [IGNORE] * 13 + tgt + [eos]
    for r in task.records("train"):
        check_loss_mask(task, r, task.encode(r))
    assert task.encode({"id": "x", "article": "Short", "highlights": "A longer highlight ."}) is None  # 1 source token
    assert task.encode({"id": "x", "article": "A long enough article .", "highlights": "Hi"}) is None
    assert task.prompt({"id": "x", "article": "Short", "highlights": "A b c"}) is None


def test_task_embeddings_train_only_new_rows_and_are_not_counted(make_cfg):
    cfg, task = nlg_task(make_cfg, "webnlg", WEBNLG, "method=lora", "budget=tiny")

    def adapted_model():
        model = load_model(cfg.model, "causal_lm", seed=0)
        return apply_method(model, describe(model), cfg.method, cfg.fidelity)

    plain = adapted_model()
    adapted = adapted_model()
    adapt_to_task(adapted, task)
    before, after = plain.count(), adapted.count()
    embed, head = adapted.model.get_input_embeddings(), adapted.model.get_output_embeddings()
    rows = embed.rows.weight
    assert embed.weight.shape == head.weight.shape == (len(task.tokenizer), 32)
    assert head.base.weight is embed.base.weight and head.rows is embed.rows  # tied: new rows are output embeddings too
    assert torch.equal(head.weight, embed.weight) and not embed.base.weight.requires_grad
    # the budget is unchanged; only the new rows (beyond the tiny model's 256) are reported as uncounted
    assert (after.total, after.trainable, after.stored) == (before.total, before.trainable, before.stored)
    assert after.uncounted == before.uncounted + (len(task.tokenizer) - 256) * 32 == rows.numel()
    assert abs(float(rows.detach().std()) - 0.02) < 0.002 and abs(float(rows.detach().mean())) < 0.002
    examples = [task.encode(r) for r in task.records("validation")[:4]]
    batch = task.collate(examples)
    loss, n = task.loss(adapted.model, batch)
    loss.backward()
    assert n == sum(sum(x != IGNORE for x in e["labels"][1:]) for e in examples)
    assert embed.base.weight.grad is None  # the pretrained matrix gets no gradient at all
    special = [task.sid(t) - 256 for t in task.special]
    assert bool((rows.grad[special].abs().sum(-1) > 0).all())
    # the adapter checkpoint holds only the new rows, not the whole matrix
    state = adapted.adapter_state_dict()
    assert state["transformer.wte.rows.weight"].shape == (len(task.tokenizer) - 256, 32)
    assert not any(v.shape[0] == 256 for v in state.values())
    state["transformer.wte.rows.weight"] = state["transformer.wte.rows.weight"] + 1.0
    adapted.load_adapter_state_dict(state)
    assert torch.equal(rows.detach(), state["transformer.wte.rows.weight"])
    assert torch.equal(embed.base.weight, plain.model.get_input_embeddings().weight)


def test_collate_pads_token_types_and_the_model_embeds_them(make_cfg):
    """Right padding with the pad id; token types change the logits (they are embedded by wte)."""
    cfg, task = nlg_task(make_cfg, "webnlg", WEBNLG)
    examples = [task.encode(r) for r in task.records("validation")[:3]]
    batch = task.collate(examples)
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["token_type_ids"].shape == (3, width)
    short = min(range(3), key=lambda i: len(examples[i]["input_ids"]))
    assert int(batch["token_type_ids"][short, -1]) == task.pad_token_id
    model = load_model(cfg.model, "causal_lm", seed=0).eval()
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    adapt_to_task(adapted, task)
    with_types, _ = task.logits_and_labels(model, batch)
    without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert not torch.allclose(with_types, without)


def test_train_webnlg_end_to_end(tmp_path):
    """kpeft.train on WebNLG with tiny sizes: train, generate per unique tripleset, score, record."""
    run_dir, record, _ = train_cli(
        "model=tiny_gpt2", f"model.tokenizer={GPT2}", "task=webnlg", f"task.data_dir={WEBNLG}",
        "task.options.max_train_examples=16", "task.options.max_eval_examples=6", "task.options.meteor=off",
        "task.options.max_new_tokens=5", "method=lora", "budget=tiny", "train.batch_size=8", "train.epochs=1",
        "train.warmup_steps=0", "train.eval_batch_size=4", root=tmp_path / "runs")
    test = record["metrics"]["test"]
    assert {"bleu_all", "bleu_seen", "ter_all", "loss"} <= set(test) and record["score"] == test["bleu_all"]
    assert record["params"]["trainable"] == 640 and record["params"]["uncounted"] == (50264 - 256) * 32
    rows = [json.loads(line) for line in (run_dir / "generations" / "test.jsonl").read_text().splitlines()]
    assert [r["eid"] for r in rows] == [f"Id{i}" for i in range(1, 7)]  # one per unique tripleset
    assert all(isinstance(r["prediction"], str) and "sentence_bleu" in r for r in rows)


def tiny_adapted(cfg, task):
    model = load_model(cfg.model, "causal_lm", seed=0).eval()
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    adapt_to_task(adapted, task)
    return adapted


def test_coqa_generation_writes_official_predictions_and_scores(make_cfg, coqa_dir, tmp_path):
    cfg, task = nlg_task(make_cfg, "coqa", coqa_dir, "task.options.n_validation=0", "task.options.max_eval_examples=4",
                         "task.options.max_new_tokens=3", "task.options.max_document_tokens=40")  # tiny_gpt2: 128 positions
    adapted = tiny_adapted(cfg, task)
    metrics = task.evaluate_generation(adapted.model, "test", tmp_path, batch_size=3)
    assert {"em", "f1", "turns", "in_domain_f1"} <= set(metrics) and metrics["turns"] == 4
    official = json.loads((tmp_path / "generations" / "test.coqa.json").read_text())
    assert [(p["id"], p["turn_id"]) for p in official] == [(r["id"], r["turn_id"]) for r in task.records("test")[:4]]
    rows = [json.loads(x) for x in (tmp_path / "generations" / "test.jsonl").read_text().splitlines()]
    assert all({"em", "f1", "golds"} <= set(r) for r in rows)
    # the official scorer on the written file agrees with the in-loop numbers for these turns
    from kpeft.metrics import coqa as metric
    golds = {(r["id"], r["turn_id"]): r["golds"] for r in rows}
    assert metric.evaluate(golds, {rows[0]["id"]: task.records("test")[0]["source"]},
                           metric.predictions_from_json(official))["f1"] == metrics["f1"]


def test_cnndm_generation_scores_rouge_per_example(make_cfg, tmp_path):
    cfg, task = nlg_task(make_cfg, "cnndm", CNNDM, "task.options.max_eval_examples=3", "task.options.max_new_tokens=4",
                         "task.options.max_source_tokens=60")
    adapted = tiny_adapted(cfg, task)
    metrics = task.evaluate_generation(adapted.model, "validation", tmp_path, batch_size=2)
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "rouge2_vglm"} <= set(metrics)
    rows = [json.loads(x) for x in (tmp_path / "generations" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"rouge2", "rouge2_vglm", "prediction"} <= set(r) for r in rows)
    assert all(len(task.tokenizer.encode(r["prediction"])) <= 6 for r in rows)


def test_gpt2_small_budget_unchanged_and_16_uncounted_rows(make_cfg):
    """GPT-2 small (meta device): with all 15 special tokens + <pad> the budget and the total stay
    the papers' (124,439,808); the 16 new rows (16 × 768) are the only uncounted numbers."""
    cfg, task = nlg_task(make_cfg, "webnlg", WEBNLG, "model=gpt2", "method=lora", "budget=small",
                         "task.options.all_special_tokens=true")
    model = load_model(cfg.model, "causal_lm", meta=True)
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    before = adapted.count()
    adapt_to_task(adapted, task)
    after = adapted.count()
    assert after.total == before.total == 124_439_808
    assert (after.trainable, after.stored) == (before.trainable, before.stored)
    assert after.uncounted == before.uncounted + 16 * 768
    assert adapted.model.get_input_embeddings().weight.shape == (50273, 768)


def test_code_fidelity_original_rows_get_a_gradient_for_clipping_only(make_cfg):
    """fidelity=code (docs/deviations.md, item 13): the original rows' gradient survives the backward pass
    (it enters the clipping norm), but that frozen matrix is never trained, saved or counted."""
    cfg, task = nlg_task(make_cfg, "webnlg", WEBNLG, "method=lora", "budget=tiny")
    model = load_model(cfg.model, "causal_lm", seed=0)
    adapted = apply_method(model, describe(model), cfg.method, cfg.fidelity)
    adapt_to_task(adapted, task, fidelity="code")
    loss, _ = task.loss(model, task.collate([task.encode(r) for r in task.records("validation")[:2]]))
    loss.backward()
    frozen = model.get_input_embeddings().base.weight
    assert frozen.grad is not None and bool((frozen.grad != 0).any())
    assert adapted.gradient_only_parameters() == [frozen]
    assert all(p is not frozen for _, p in adapted.trainable_parameters())
    assert "transformer.wte.base.weight" not in adapted.adapter_state_dict()
    assert adapted.count().uncounted == (len(task.tokenizer) - 256) * 32
