"""Batched greedy decoding with a KV cache equals a naive unbatched, uncached loop ([KM] App. B.2)."""

from __future__ import annotations

import pytest
import torch

from kpeft.training.decode import greedy_decode
from tests.helpers import lora, randomise, tiny_model


def naive_greedy(model, prompt, max_new_tokens, stop, types=None, gen_type=None):
    """One example, re-encoding the whole prefix at every step, no cache, no padding."""
    ids, tt, out = list(prompt), None if types is None else list(types), []
    for _ in range(max_new_tokens):
        kwargs = {"input_ids": torch.tensor([ids]), "use_cache": False}
        if tt is not None:
            kwargs["token_type_ids"] = torch.tensor([tt])
        nxt = int(model(**kwargs).logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
        ids.append(nxt)
        if tt is not None:
            tt.append(tt[-1] if gen_type is None else gen_type)
    return out


def prompts(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 1, 6, 12][:n]
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("merged", [False, True])
def test_batched_cached_equals_naive(family, merged):
    torch.manual_seed(0)
    model = tiny_model(family).double()
    adapted = lora(model)
    randomise(adapted, scale=0.3)
    if merged:
        adapted.merge()
    ps = prompts()
    # stop ids: a few frequent tokens of the naive runs, so that some sequences stop early
    free = [naive_greedy(model, p, 12, set()) for p in ps]
    stop = {free[0][3], free[1][5]}
    want = [naive_greedy(model, p, 12, stop) for p in ps]
    got = greedy_decode(model, ps, max_new_tokens=12, stop_ids=stop, pad_id=0, batch_size=4)
    assert got == want
    assert any(len(w) < 12 for w in want) and any(len(w) == 12 for w in want)


def test_token_types_gpt2():
    model = tiny_model("gpt2").double()
    ps = prompts(1)
    types = [[250] * (len(p) - 1) + [251] for p in ps]
    want = [naive_greedy(model, p, 8, {7}, t, 252) for p, t in zip(ps, types)]
    got = greedy_decode(model, ps, max_new_tokens=8, stop_ids={7}, pad_id=0, token_types=types, gen_token_type=252)
    assert got == want
    want_same = [naive_greedy(model, p, 8, set(), t) for p, t in zip(ps, types)]
    assert greedy_decode(model, ps, max_new_tokens=8, token_types=types, batch_size=2) == want_same


@pytest.mark.parametrize("method, budget", [
    ("prefix", "small"),
    ("kernel_mix_qvo", "intermediate"),
    ("inducer", "intermediate"),
])
def test_batched_cached_equals_naive_other_methods(method, budget):
    from kpeft.backbones import describe
    from kpeft.methods import apply_method
    from tests.helpers import method_cfg

    model = tiny_model("gpt2").double()
    adapted = apply_method(model, describe(model), method_cfg(method, budget=budget))
    randomise(adapted, scale=0.3)
    model.double().eval()
    ps = prompts()
    want = [naive_greedy(model, p, 8, set()) for p in ps]
    assert greedy_decode(model, ps, max_new_tokens=8, batch_size=5) == want
