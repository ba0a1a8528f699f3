"""Beam search with a KV cache (kpeft/training/beam.py) gives the tokens of transformers'
``model.generate`` with the same settings, on GPT-2 / Llama (LoRA, prefix, inducer; left-padded
batches, GPT-2 token types) and T5; one beam is greedy decoding; the n-gram bans are transformers'."""

from __future__ import annotations

import pytest
import torch
from helpers import lora, method_cfg, randomise, tiny_model
from transformers import NoRepeatNGramLogitsProcessor

from kpeft.backbones import describe
from kpeft.errors import KpeftError
from kpeft.methods import apply_method
from kpeft.training.beam import DecodeSettings, banned_ngram_mask, beam_decode, beam_decode_seq2seq
from kpeft.training.decode import decode, decode_seq2seq, greedy_decode, greedy_decode_seq2seq

SETTINGS = [
    DecodeSettings(3),
    DecodeSettings(4, length_penalty=0.6, no_repeat_ngram_size=2, early_stopping=True),
    DecodeSettings(3, length_penalty=1.5, early_stopping="never"),
    DecodeSettings(2, length_penalty=-0.5, no_repeat_ngram_size=3),
]
T = 10


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in (3, 9, 1, 6, 12)]


def cut(row: list[int], stop: set[int], length: int) -> list[int]:
    """generate's generated row without its stop token (or its first `length` tokens)."""
    end = next((i for i, t in enumerate(row) if t in stop), None)
    return row[:end] if end is not None else row[:length]


def generate_each(model, ps, s: DecodeSettings, stop, types=None):
    """transformers' generate on each prompt alone (no padding)."""
    out = []
    for i, p in enumerate(ps):
        kw = {"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.long)}
        if types is not None:
            kw["token_type_ids"] = torch.tensor([types[i]])
        row = model.generate(**kw, max_new_tokens=T, eos_token_id=sorted(stop), pad_token_id=0, **s.generate_kwargs())
        out.append(cut(row[0, len(p):].tolist(), stop, T))
    return out


def adapted_causal(family: str, method: str):
    torch.manual_seed(0)
    model = tiny_model(family).double()
    if method == "lora":
        adapted = lora(model)
    else:
        budget = "intermediate" if method in ("inducer", "kernel_mix_qvo") else "small"
        adapted = apply_method(model, describe(model), method_cfg(method, budget=budget))
    randomise(adapted, scale=0.5)
    return model.double().eval()


def stops_for(model, ps):
    """Two tokens of the free greedy runs: some hypotheses stop early, others run to the limit."""
    free = greedy_decode(model, ps, max_new_tokens=T)
    return {free[1][2], free[3][4]}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "kernel_mix_qvo", "parallel_adapter", "prefix", "inducer"])
def test_causal_beam_equals_generate(family, method):
    model = adapted_causal(family, method)
    ps = prompts()
    stop = stops_for(model, ps)
    lengths = set()
    for s in SETTINGS:
        want = generate_each(model, ps, s, stop)
        assert beam_decode(model, ps, s, max_new_tokens=T, stop_ids=stop, batch_size=3) == want, s
        lengths |= {len(w) for w in want}
    assert len(lengths) >= 2  # varied lengths: the stop ids act


def test_gpt2_token_types_follow_the_prompt():
    model = adapted_causal("gpt2", "lora")
    ps = prompts(1)
    types = [[250] * (len(p) - 1) + [251] for p in ps]  # generate repeats the last type for new tokens
    stop = stops_for(model, ps)
    s = DecodeSettings(3, length_penalty=0.8, no_repeat_ngram_size=2)
    want = generate_each(model, ps, s, stop, types)
    got = beam_decode(model, ps, s, max_new_tokens=T, stop_ids=stop, token_types=types, gen_token_type=251)
    assert got == want
    assert got == beam_decode(model, ps, s, max_new_tokens=T, stop_ids=stop, token_types=types, batch_size=2)
    assert got != beam_decode(model, ps, s, max_new_tokens=T, stop_ids=stop)  # the types act


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_beam_is_greedy(family):
    model = adapted_causal(family, "lora")
    ps = prompts()
    stop = stops_for(model, ps)
    greedy = greedy_decode(model, ps, max_new_tokens=T, stop_ids=stop)
    assert decode(model, ps, DecodeSettings(1), max_new_tokens=T, stop_ids=stop) == greedy
    assert generate_each(model, ps, DecodeSettings(1), stop) == greedy
    assert decode(model, ps, DecodeSettings(3), max_new_tokens=T, stop_ids=stop) != greedy  # beams differ here


def diverse_t5():
    """tiny_t5 (fp64) with N(0, 0.5²) weights: varied outputs (T5's small init repeats one token)."""
    model = tiny_model("t5").double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


@pytest.mark.parametrize("method", ["lora", "prefix", "inducer"])
def test_t5_beam_equals_generate(method):
    model = diverse_t5()
    if method == "lora":
        mcfg = method_cfg("lora", "method.components.lora.r=2", "method.components.lora.attention=all", budget="t5_glue")
    else:
        mcfg = method_cfg(method, budget="small" if method == "prefix" else "intermediate")
    randomise(apply_method(model, describe(model), mcfg), scale=0.3)
    model.double().eval()
    srcs = prompts()
    free = greedy_decode_seq2seq(model, srcs, max_new_tokens=T)
    stop = {free[1][2], free[3][4]}
    assert decode_seq2seq(model, srcs, DecodeSettings(1), max_new_tokens=T, stop_ids=stop) == \
        greedy_decode_seq2seq(model, srcs, max_new_tokens=T, stop_ids=stop)
    for s in SETTINGS:
        want = []
        for x in srcs:
            row = model.generate(input_ids=torch.tensor([x]), max_new_tokens=T, eos_token_id=sorted(stop),
                                 pad_token_id=0, decoder_start_token_id=0, **s.generate_kwargs())
            want.append(cut(row[0, 1:].tolist(), stop, T))
        assert beam_decode_seq2seq(model, srcs, s, max_new_tokens=T, stop_ids=stop, batch_size=3) == want, s


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_bans_equal_transformers(n):
    g = torch.Generator().manual_seed(n)
    seq = torch.randint(0, 5, (6, 14), generator=g)  # a small alphabet: many repeats
    want = NoRepeatNGramLogitsProcessor(n)(seq, torch.zeros(6, 5)) == -float("inf")
    assert torch.equal(banned_ngram_mask(seq, torch.ones_like(seq, dtype=torch.bool), n, 5), want)
    # left padding never forms n-grams: a padded row bans what the unpadded row bans
    padded = torch.cat([torch.zeros(6, 3, dtype=torch.long), seq], 1)
    valid = torch.cat([torch.zeros(6, 3, dtype=torch.bool), torch.ones_like(seq, dtype=torch.bool)], 1)
    assert torch.equal(banned_ngram_mask(padded, valid, n, 5), want)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 0}, "decode.num_beams must be >= 1"),
    ({"num_beams": 1, "no_repeat_ngram_size": 3}, "needs beam search"),
    ({"num_beams": 2, "early_stopping": "sometimes"}, "true, false or never"),
    ({"num_beams": 2, "max_new_tokens": 0}, "decode.max_new_tokens must be >= 1"),
])
def test_wrong_settings_fail_with_one_line(kwargs, message):
    with pytest.raises(KpeftError, match=message) as err:
        DecodeSettings(**kwargs)
    assert "\n" not in str(err.value)


def test_decode_section_reaches_the_settings(make_cfg):
    cfg = make_cfg("task=webnlg", "decode.num_beams=4", "decode.early_stopping=never", "decode.max_new_tokens=7")
    s = DecodeSettings.from_config(cfg.decode)
    assert (s.num_beams, s.early_stopping, s.tokens(40)) == (4, "never", 7)
    default = DecodeSettings.from_config(make_cfg("task=webnlg").decode)
    assert default == DecodeSettings() and default.greedy and default.tokens(40) == 40
    assert DecodeSettings.from_config(make_cfg("decode.early_stopping=true").decode).early_stopping is True


def test_decode_section_drives_nlg_evaluation(make_cfg, tmp_path):
    """``decode.num_beams=3`` in a run: the task built by kpeft.train decodes the test split with
    beams (the predictions written are beam_decode's), capped by ``decode.max_new_tokens``."""
    import json

    from helpers import FIXTURES

    from kpeft.paths import packaged_tokenizer
    from kpeft.train import build

    gpt2, webnlg = packaged_tokenizer("gpt2"), FIXTURES / "webnlg2017"
    cfg = make_cfg("model=tiny_gpt2", f"model.tokenizer={gpt2}", "task=webnlg", f"task.data_dir={webnlg}",
                   "task.options.max_train_examples=2", "task.options.max_eval_examples=4", "task.options.meteor=off",
                   "method=lora", "budget=tiny", "decode.num_beams=3", "decode.max_new_tokens=6")
    adapted, task, _ = build(cfg)
    assert task.decoding == DecodeSettings(3, max_new_tokens=6) and task.max_new_tokens() == 6
    model = adapted.model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # an untrained tiny model: varied, non-trivial outputs
    task.evaluate_generation(model, "test", tmp_path, batch_size=3)
    written = [json.loads(x)["prediction"] for x in (tmp_path / "generations" / "test.jsonl").read_text().splitlines()]
    records = task._cap(task.generation_records("test"), "test")
    ps = [task.prompt(r) for r in records]
    ids = beam_decode(model, [p[0] for p in ps], task.decoding, max_new_tokens=6, stop_ids=task.stop_ids,
                      pad_id=task.pad_token_id, token_types=[p[1] for p in ps], gen_token_type=ps[0][1][-1])
    assert written == [task.tokenizer.decode(o, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                       for o in ids]
    greedy = greedy_decode(model, [p[0] for p in ps], max_new_tokens=6, stop_ids=task.stop_ids,
                           pad_id=task.pad_token_id, token_types=[p[1] for p in ps], gen_token_type=ps[0][1][-1])
    assert ids != greedy and max(len(o) for o in ids) <= 6
