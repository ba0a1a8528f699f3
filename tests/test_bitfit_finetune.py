"""BitFit (Ben Zaken et al. 2022: every bias, LayerNorm biases included, tied LM head frozen) and full
fine-tuning ([KM] Table 1) on the tiny backbones."""

from __future__ import annotations

import pytest
import torch
from helpers import inputs, method_cfg, output, tiny_model

from kpeft.backbones import describe
from kpeft.errors import KpeftError
from kpeft.methods import apply_method


def apply(model, method: str, *overrides: str):
    return apply_method(model, describe(model), method_cfg(method, *overrides))


def trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_bitfit_on_gpt2_trains_exactly_the_biases():
    model = tiny_model("gpt2")
    cfg = model.config
    d, inner, layers = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd, cfg.n_layer
    adapted = apply(model, "bitfit")
    names = trained(model)
    assert names and all(n.endswith(".bias") for n in names)
    # Every bias parameter of the model, and only those.
    assert names == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    # ln_1 β, c_attn (q|k|v), attn.c_proj, ln_2 β, mlp.c_fc, mlp.c_proj per block; then ln_f β.
    per_block = d + 3 * d + d + d + inner + d
    expected = layers * per_block + d
    assert expected == 2 * (11 * 32) + 32  # tiny_gpt2: d = 32, FFN 128, 2 layers
    count = adapted.count()
    assert count.trainable == count.stored == expected
    assert count.total == sum(p.numel() for p in model.parameters())
    assert count.uncounted == 0
    # The tied LM head (= wte) stays frozen, as do all weights.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.lm_head.weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith(".bias"))
    assert adapted.mergeable  # nothing to merge: biases are backbone tensors


def test_bitfit_without_layernorm_biases():
    model = tiny_model("gpt2")
    d, layers = model.config.n_embd, model.config.n_layer
    adapted = apply(model, "bitfit", "method.components.bitfit.include_ln_bias=false")
    assert not any(".ln_" in n for n in trained(model))
    assert adapted.count().trainable == layers * (3 * d + d + 4 * d + d)


def test_bitfit_trains_the_classifier_but_does_not_count_it():
    model = tiny_model("roberta_cls")
    anatomy = describe(model)
    adapted = apply_method(model, anatomy, method_cfg("bitfit"))
    head = sum(p.numel() for p in anatomy.task_head_params)
    assert head == (32 * 32 + 32) + (32 * 3 + 3)  # classifier.dense + classifier.out_proj
    backbone_biases = sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")
    )
    count = adapted.count()
    assert (count.trainable, count.uncounted) == (backbone_biases, head)
    assert all(p.requires_grad for p in anatomy.task_head_params)
    assert count.total == sum(p.numel() for p in model.parameters()) - head


def test_bitfit_on_t5_has_nothing_to_train():
    model = tiny_model("t5")
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    with pytest.raises(KpeftError, match=r"method 'bitfit' found nothing to train on backbone 't5'"):
        apply(model, "bitfit", "method.components.bitfit.add_missing_biases=false")


def test_bitfit_on_t5_adds_zero_biases_that_act():
    """The Compacter code's BitFit on T5: zero biases on every linear layer (LM head included) and RMS
    norm; the model is unchanged until they train, and a norm's bias shifts that norm's output."""
    model = tiny_model("t5")
    adapted = apply(model, "bitfit")
    cfg = model.config
    d, ff, layers = cfg.d_model, cfg.d_ff, cfg.num_layers  # 32, 64, 2 (+ 2 decoder layers)
    inner = cfg.num_heads * cfg.d_kv
    attention = (2 * layers + layers) * (3 * inner + d)  # encoder self, decoder self + cross: q k v o
    ffn = 2 * layers * (ff + d)
    norms = (2 * layers + 1 + 3 * layers + 1) * d
    assert adapted.count().trainable == attention + ffn + norms + cfg.vocab_size
    names = trained(model)
    assert names == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert "lm_head.bias" in names and "encoder.final_layer_norm.bias" in names
    # (zero biases change nothing: tests/test_matrix.py)
    norm = model.encoder.final_layer_norm
    x = torch.randn(2, 3, d)
    plain = norm(x)
    with torch.no_grad():
        norm.bias.fill_(0.5)
    assert torch.allclose(norm(x), plain + 0.5)


@pytest.mark.parametrize("family", ["gpt2", "t5", "llama", "roberta_cls"])
def test_finetune_trains_everything(family):
    model = tiny_model(family)
    anatomy = describe(model)
    head = sum(p.numel() for p in anatomy.task_head_params)
    adapted = apply_method(model, anatomy, method_cfg("finetune"))
    assert all(p.requires_grad for p in model.parameters())
    count = adapted.count()
    everything = sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert count.total == count.trainable == count.stored == everything - head
    assert count.uncounted == head
    assert count.trainable_pct == 100.0
    # (gradients reach every parameter, the LM head through the tied embedding: tests/test_matrix.py)


def test_finetune_adapter_state_dict_holds_every_tensor_once():
    model = tiny_model("gpt2")
    adapted = apply(model, "finetune")
    state = adapted.adapter_state_dict()
    assert "lm_head.weight" not in state  # tied to transformer.wte.weight, saved once
    assert sum(t.numel() for t in state.values()) == adapted.count().trainable
    batch = inputs("gpt2")
    expected = output(model, batch)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    adapted.load_adapter_state_dict(state)
    assert torch.equal(output(model, batch), expected)
