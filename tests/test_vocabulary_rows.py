"""The task-token rows (kpeft/methods/vocabulary.py): an NLG task trained with weight decay leaves
every pretrained parameter bit-identical, the optimizer holds state for the trained tensors only,
and the saved adapter reloads to the in-process model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIXTURES

import kpeft
from kpeft.backbones.loading import load_model
from kpeft.methods.vocabulary import ExtendedEmbedding, VocabularyRows, folded
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.train import build
from kpeft.training.loop import Trainer, make_accelerator

GPT2 = PACKAGED_TOKENIZERS["gpt2"]
WEBNLG = FIXTURES / "webnlg2017"


def webnlg(make_cfg, *overrides):
    """LoRA + task embeddings on tiny GPT-2 for WebNLG (8 training examples)."""
    cfg = make_cfg("model=tiny_gpt2", f"model.tokenizer={GPT2}", "task=webnlg", f"task.data_dir={WEBNLG}",
                   "task.options.max_train_examples=8", "task.options.max_eval_examples=2", "method=lora",
                   "budget=tiny", "train.batch_size=4", "train.epochs=1", "train.warmup_steps=0", "train.lr=0.05",
                   "train.weight_decay=0.1", "train.eval_batch_size=2", *overrides)
    torch.manual_seed(cfg.seed)
    return (cfg, *build(cfg))


def train_webnlg(make_cfg, *overrides):
    """Two AdamW steps (lr 0.05, weight decay 0.1); also returns the new rows as initialised."""
    cfg, adapted, task, splits = webnlg(make_cfg, *overrides)
    start = adapted.model.get_input_embeddings().rows.weight.detach().clone()
    trainer = Trainer(cfg, adapted, task, splits, Path(cfg.run_dir), make_accelerator(cfg.train))
    assert trainer.fit().global_step == 2
    adapted.model.eval()
    return cfg, adapted, task, trainer, start


def logits(model, task):
    batch = task.collate([task.encode(r) for r in task.records("validation")[:2]])
    with torch.no_grad():
        return task.logits_and_labels(model, batch)[0]


def assert_pretrained_untouched(cfg, adapted):
    """Every backbone parameter equals a freshly loaded backbone's, bit for bit (wrappers' ``.base``
    segments dropped from the names)."""
    fresh = dict(load_model(cfg.model, "causal_lm", seed=cfg.seed).named_parameters())
    mine = {n.replace(".base.", "."): p for n, p in adapted.model.named_parameters()}
    assert fresh and all(torch.equal(mine[n], p) for n, p in fresh.items())


@pytest.mark.parametrize("fidelity", ["paper", "code"])
def test_weight_decay_leaves_pretrained_rows_and_reloads_exactly(make_cfg, tmp_path, fidelity):
    cfg, adapted, task, trainer, start = train_webnlg(make_cfg, f"fidelity={fidelity}")
    embed = adapted.model.get_input_embeddings()
    assert isinstance(embed, ExtendedEmbedding) and embed.base.weight.grad is None
    assert_pretrained_untouched(cfg, adapted)
    assert isinstance(embed.rows, VocabularyRows) and embed.rows.weight.shape == (len(task.tokenizer) - 256, 32)
    assert not torch.equal(embed.rows.weight.detach(), start)  # the new rows did train
    # AdamW keeps state for the trained tensors only: LoRA (640) and the new rows, never the 256 × 32 matrix
    state = trainer.optimizer.optimizer.state
    trained = {id(p) for _, p in adapted.trainable_parameters()}
    assert set(map(id, state)) == trained and id(embed.base.weight) not in trained
    assert sum(s["exp_avg"].numel() for s in state.values()) == 640 + (len(task.tokenizer) - 256) * 32
    # the run's best checkpoint (its only epoch) reloads to the in-process logits, bit for bit
    here = logits(adapted.model, task)
    run = kpeft.load_run(cfg.run_dir)
    assert torch.equal(logits(run.model.model, run.task), here)
    # and so does the API's adapter directory on a fresh backbone (256 rows: the rows are added back)
    adapted.method_cfg, adapted.fidelity = cfg.method, cfg.fidelity
    kpeft.save_adapter(adapted, tmp_path / "adapter")
    loaded = kpeft.load_adapter(load_model(cfg.model, "causal_lm", seed=cfg.seed).eval(), tmp_path / "adapter")
    assert loaded.vocabulary == {"rows_from": 256, "rows": len(task.tokenizer), "token_types": True}
    assert torch.equal(logits(loaded.model, task), here)
    assert loaded.count() == adapted.count()


def test_folded_is_the_plain_resized_model(make_cfg):
    """Export's view: a plain (total, d) embedding tied to the head gives the extended model's logits."""
    _, adapted, task, _ = webnlg(make_cfg)
    adapted.model.eval()
    here = logits(adapted.model, task)
    with folded(adapted.model) as model:
        embed = model.get_input_embeddings()
        assert type(embed) is torch.nn.Embedding and model.get_output_embeddings().weight is embed.weight
        assert embed.weight.shape == (len(task.tokenizer), 32)
        torch.testing.assert_close(logits(model, task), here, rtol=0, atol=1e-6)
    assert isinstance(adapted.model.get_input_embeddings(), ExtendedEmbedding)


def test_adapters_of_earlier_versions_still_load(make_cfg):
    """Before the rows were their own parameter, adapters held them as ``transformer.wte.weight``."""
    _, adapted, task, _ = webnlg(make_cfg)
    state = adapted.adapter_state_dict()
    rows = state.pop("transformer.wte.rows.weight")
    adapted.load_adapter_state_dict({**state, "transformer.wte.weight": rows + 1})
    assert torch.equal(adapted.model.get_input_embeddings().rows.weight.detach(), rows + 1)
