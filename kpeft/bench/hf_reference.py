"""``python -m kpeft.bench.hf_reference JOB.json``: the job of ``kpeft.bench --runs`` written as a
user would write it without kpeft — ``transformers.Trainer`` + PEFT LoRA, the same model, data,
epochs, batch sizes, learning-rate schedule (linear warm-up and decay), AdamW settings, clipping,
max length, per-epoch validation loss with the best epoch's adapter loaded at the end.

* classification (SST-2): ``datasets`` reads the TSVs, the tokenizer encodes them,
  ``DataCollatorWithPadding`` pads, ``Trainer.predict`` gives the test logits, accuracy by NumPy;
* generation (WebNLG): the same encoded examples as kpeft (its WebNLG reader and encoder: triples,
  special tokens, task embeddings — there is no off-the-shelf one), PEFT's ``trainable_token_indices``
  for the new special-token embeddings, ``model.generate`` (greedy, left-padded batches in file
  order) for the test entries, the challenge BLEU of kpeft's scorer.

The phase marks (see :mod:`kpeft.bench.child_kpeft`; ``eval_end`` after the scorer, whose own
seconds are ``scorer_s``) go to ``KPEFT_BENCH_OUT``.
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = float(os.environ.get("KPEFT_BENCH_T0", time.time()))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)


def training_args(spec: dict, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=spec["out_dir"], num_train_epochs=spec["epochs"], per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["eval_batch"], learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"],
        max_grad_norm=spec["max_grad_norm"], lr_scheduler_type="linear",
        warmup_steps=spec["warmup_steps"], eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        save_total_limit=1, logging_strategy="no", report_to=[], disable_tqdm=True, seed=spec["seed"],
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), label_smoothing_factor=0.0,
    )


def classification(spec: dict, marks: dict) -> float:
    from datasets import load_dataset

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=2)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=spec["r"], lora_alpha=spec["alpha"],
                      lora_dropout=spec["dropout"], target_modules=["query", "value"])
    model = get_peft_model(model, lora)
    marks["startup"] = time.time()
    files = {"train": f"{spec['data_dir']}/train.tsv", "test": f"{spec['data_dir']}/dev.tsv"}
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=3)
    data = raw.map(lambda b: tok(b["sentence"], truncation=True, max_length=spec["max_length"]), batched=True,
                   remove_columns=["sentence"])
    marks["data"] = time.time()
    trainer = Trainer(model=model, args=training_args(spec, 0), train_dataset=data["train"],
                      eval_dataset=data["test"], data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    marks["train"] = time.time()
    out = trainer.predict(data["test"])
    t = time.perf_counter()
    accuracy = 100.0 * float(np.mean(np.argmax(out.predictions, -1) == out.label_ids))
    marks["scorer_s"] = time.perf_counter() - t
    marks["eval_end"] = time.time()
    return accuracy


def generation(spec: dict, marks: dict) -> float:
    from kpeft.backbones.loading import load_model, load_tokenizer
    from kpeft.compose import compose
    from kpeft.tasks import task_class

    cfg = compose(spec["overrides"])
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, "causal_lm", seed=cfg.seed)  # the same random init as kpeft's
    marks["startup"] = time.time()
    task = task_class(cfg.task)(cfg.task, tok)
    splits = task.load_splits()
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=["c_attn"], fan_in_fan_out=True,
                      trainable_token_indices={"wte": list(range(old, len(tok)))})
    model = get_peft_model(model, lora)
    marks["data"] = time.time()
    trainer = Trainer(model=model, args=training_args(spec, 0), train_dataset=splits["train"],
                      eval_dataset=splits["validation"], data_collator=task.collate)
    trainer.train()
    marks["train"] = time.time()
    records = task.generation_records("test")[: spec["eval"]]
    model.eval()
    predictions = []
    pad = task.pad_token_id
    with torch.no_grad():
        for start in range(0, len(records), spec["eval_batch"]):
            prompts = [task.prompt(r) for r in records[start : start + spec["eval_batch"]]]
            width = max(len(p[0]) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p[0])) + list(p[0]) for p in prompts])
            types = torch.tensor([[pad] * (width - len(p[1])) + list(p[1]) for p in prompts])
            mask = (torch.arange(width)[None] >= torch.tensor([width - len(p[0]) for p in prompts])[:, None]).long()
            out = model.generate(input_ids=ids, attention_mask=mask, token_type_ids=types, do_sample=False,
                                 max_new_tokens=task.max_new_tokens(), eos_token_id=sorted(task.stop_ids),
                                 pad_token_id=pad)
            predictions += [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    t = time.perf_counter()
    metrics, _ = task.score_generations(records, predictions)
    marks["scorer_s"] = time.perf_counter() - t
    marks["eval_end"] = time.time()
    return float(metrics[cfg.task.metric])


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    set_seed(spec["seed"])
    marks: dict[str, float] = {}
    score = (classification if spec["kind"] == "classification" else generation)(spec, marks)
    marks["scoring"] = time.time()
    with open(os.environ["KPEFT_BENCH_OUT"], "w", encoding="utf-8") as f:
        json.dump({"t0": T0, "marks": marks, "score": score}, f)


if __name__ == "__main__":
    main()
