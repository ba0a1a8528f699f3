"""Batched, cached greedy decoding of an encoder-decoder (T5) equals a naive unbatched loop that
re-runs the whole model on the full decoder prefix at every step, and equals transformers' own
greedy ``generate``; with LoRA and KronA, merged and unmerged."""

from __future__ import annotations

import pytest
import torch
from helpers import method_cfg, randomise, tiny_model

from kpeft.backbones import describe
from kpeft.methods import apply_method
from kpeft.training.decode import greedy_decode_seq2seq

START = 0  # tiny_t5's decoder_start_token_id (= pad)


def naive_greedy(model, source, max_new_tokens):
    """One input alone, no padding, no cache: the decoder prefix is re-run at every step."""
    decoded, out = [START], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([source]), decoder_input_ids=torch.tensor([decoded]),
                       use_cache=False).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        decoded.append(nxt)
    return out


def stop_token(free):
    """A token that some free runs produce and others never do: some sequences stop early."""
    return next(t for seq in free for t in seq if any(t not in other for other in free))


def sources(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in (3, 9, 1, 6, 12)]


def diverse_t5():
    """tiny_t5 (fp64) with weights N(0, 0.5²) instead of T5's small init, which makes the random
    model repeat one token: varied outputs make the comparison meaningful."""
    model = tiny_model("t5").double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def adapted(method: str):
    model = diverse_t5()
    if method == "lora":
        mcfg = method_cfg("lora", "method.components.lora.r=2", "method.components.lora.dropout=0.0",
                          "method.components.lora.attention=all", budget="t5_glue")
    else:  # KronA at tiny_t5's width 32: A = (4, 8), B = (8, 4) on W_q, W_v of all 6 attention modules
        mcfg = method_cfg("krona", "budget.krona.a_shape=[4,8]", "budget.krona.b_shape=[8,4]", budget="t5_glue")
    result = apply_method(model, describe(model), mcfg)
    randomise(result, scale=0.3)
    return result


@pytest.mark.parametrize("method", ["lora", "krona"])
@pytest.mark.parametrize("merged", [False, True])
def test_batched_cached_equals_naive(method, merged):
    adapt = adapted(method)
    model = adapt.model
    if merged:
        adapt.merge()
    srcs = sources()
    free = [naive_greedy(model, s, 8) for s in srcs]
    assert greedy_decode_seq2seq(model, srcs, max_new_tokens=8, batch_size=3) == free
    stop = {stop_token(free)}
    want = [seq[: next((i for i, t in enumerate(seq) if t in stop), len(seq))] for seq in free]
    got = greedy_decode_seq2seq(model, srcs, max_new_tokens=8, stop_ids=stop, pad_id=0, batch_size=3)
    assert got == want
    assert any(len(w) < 8 for w in want) and any(len(w) == 8 for w in want)
    assert got != greedy_decode_seq2seq(diverse_t5(), srcs, max_new_tokens=8, stop_ids=stop)  # the method acts


def test_equals_transformers_greedy_generate():
    model = diverse_t5()
    srcs = sources(2)
    eos = model.config.eos_token_id
    got = greedy_decode_seq2seq(model, srcs, max_new_tokens=6, stop_ids={eos}, batch_size=5)
    for src, ours in zip(srcs, got):
        ref = model.generate(torch.tensor([src]), max_new_tokens=6, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=0, decoder_start_token_id=START)[0].tolist()
        ref = ref[1:]  # without the start token
        assert ours == (ref[: ref.index(eos)] if eos in ref else ref)
