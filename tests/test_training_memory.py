"""Options big models need (docs/training_memory.md): gradient checkpointing gives the loss and
gradients of the run without it (weight- and attention-site methods, frozen embeddings, dropout
on), and ``model.dtype=bfloat16`` trains on CPU with bf16 weights, activations and components."""

from __future__ import annotations

import pytest
import torch
from helpers import method_cfg, randomise, tiny_model

from kpeft.backbones import describe
from kpeft.compose import compose
from kpeft.errors import KpeftError
from kpeft.methods import apply_method
from kpeft.train import run
from kpeft.training.memory import enable_gradient_checkpointing

METHODS = {"lora": "small", "prefix": "small", "inducer": "intermediate", "parallel_adapter": "small"}


def loss_and_grads(family: str, method: str, checkpointing: bool):
    """One training-mode forward/backward (dropout on) of a fixed batch under a fixed seed."""
    model = tiny_model(family).double()
    adapted = apply_method(model, describe(model), method_cfg(method, budget=METHODS[method]))
    randomise(adapted, scale=0.3)  # no zero-initialised factor: every gradient is non-zero
    model.train()
    calls = []
    attention = describe(model).layers[0].self_attention.module  # inside the checkpointed block
    attention.register_forward_pre_hook(lambda *_: calls.append(1))
    if checkpointing:
        enable_gradient_checkpointing(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    torch.manual_seed(1)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert set(grads) == {n for n, _ in adapted.trainable_parameters()}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, method):
    loss, grads, calls = loss_and_grads(family, method, checkpointing=False)
    loss_ck, grads_ck, calls_ck = loss_and_grads(family, method, checkpointing=True)
    assert (calls, calls_ck) == (1, 2)  # with checkpointing the block runs again in the backward pass
    torch.testing.assert_close(loss_ck, loss, rtol=1e-12, atol=1e-12)
    assert grads_ck.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)
        assert grads[name].abs().sum() > 0, name


def test_a_model_without_checkpointing_support_is_refused_in_one_line():
    with pytest.raises(KpeftError, match="gradient_checkpointing=false") as err:
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
    assert "\n" not in str(err.value)


def _run(tmp_path, *overrides):
    cfg = compose(["task=demo_reverse", "train.epochs=1", f"output_root={tmp_path}", "train.progress=false",
                   "task.options.n_train=64", "task.options.n_val=16", "task.options.n_test=16", *overrides])
    return run(cfg)


def test_a_checkpointed_training_run_equals_the_plain_one(tmp_path):
    common = ("model=tiny_llama", "method=inducer", "budget=intermediate")
    plain = _run(tmp_path / "a", *common)
    checkpointed = _run(tmp_path / "b", *common, "train.gradient_checkpointing=true")
    assert plain["status"] == checkpointed["status"] == "complete"
    assert checkpointed["metrics"]["test"]["loss"] == pytest.approx(plain["metrics"]["test"]["loss"], rel=1e-5)


@pytest.mark.parametrize("model, method, budget", [
    ("tiny_gpt2", "lora", "small"), ("tiny_llama", "prefix", "small"), ("tiny_llama", "inducer", "intermediate"),
    ("tiny_qwen2", "kernel_mix_qvo", "intermediate"), ("tiny_gpt2", "parallel_adapter", "small"),
])
def test_bfloat16_training_completes_on_cpu(tmp_path, model, method, budget):
    record = _run(tmp_path, f"model={model}", "model.dtype=bfloat16", f"method={method}", f"budget={budget}",
                  "train.gradient_checkpointing=true")
    assert record["status"] == "complete" and record["training"]["steps"] == 2  # 64 examples, batch 32
    assert torch.isfinite(torch.tensor(record["metrics"]["test"]["loss"]))


def test_bfloat16_components_live_in_the_models_dtype():
    from kpeft.backbones.loading import load_model

    cfg = compose(["model=tiny_llama", "model.dtype=bfloat16"])
    model = load_model(cfg.model, "causal_lm", seed=0)
    adapted = apply_method(model, describe(model), method_cfg("inducer", budget="intermediate"))
    trained = [p for _, p in adapted.trainable_parameters()]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    out = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trained)
