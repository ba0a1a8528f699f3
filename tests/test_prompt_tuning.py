"""Prompt tuning (Lester et al. 2021): on all four families the prompted model equals the frozen
model run on a manual concatenation of the prompt with the input embeddings (an independent
formulation); the causal-LM loss scores only real tokens; init from the vocabulary / a text /
uniform; only the prompt trains; counts; batched cached greedy decoding equals unbatched uncached.
The generic checks (save/load, cache, padding, gradients) run on all five heads in tests/test_matrix.py."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    check_future_tokens_do_not_leak,
    config,
    inputs,
    method_cfg,
    output,
)
from helpers import tiny_model as _tiny_model
from omegaconf import OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.cache_api import cache_arg
from kpeft.backbones.loading import load_model
from kpeft.count import main as count_main
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.prompt import PromptTuning, text_init_ids, vocab_init_ids
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.tasks.base import IGNORE, Task
from kpeft.training.decode import greedy_decode

FOUR = ["gpt2", "roberta_cls", "roberta_base", "t5", "llama"]
N = 3  # prompt length in the tests
GPT2_TOKENIZER = PACKAGED_TOKENIZERS["gpt2"]


@functools.cache
def _cached_model(family: str) -> torch.nn.Module:
    return _tiny_model(family).double()


def tiny_model(family: str) -> torch.nn.Module:
    """A fresh float64 copy of the tiny `family` model (built once per test session)."""
    return copy.deepcopy(_cached_model(family))


@functools.cache
def pt_cfg(*overrides: str, length: int = N):
    return method_cfg("prompt_tuning", f"budget.prompt_tuning.length={length}", *overrides, budget="small")


def adapt(model: torch.nn.Module, *overrides: str, length: int = N) -> AdaptedModel:
    return apply_method(model, describe(model), pt_cfg(*overrides, length=length))


def prompt_of(adapted: AdaptedModel) -> PromptTuning:
    (comp,) = adapted.all_components()
    return comp


def manual(frozen: torch.nn.Module, prompt: torch.Tensor, batch: dict, k: int) -> torch.Tensor:
    """The frozen model on ``[E(x)_{<k}; P; E(x)_{≥k}]`` with the mask extended by ones; the prompt
    rows are cut from token-level outputs."""
    embeds = frozen.get_input_embeddings()(batch["input_ids"])
    b, n = embeds.shape[0], prompt.shape[0]
    embeds = torch.cat([embeds[:, :k], prompt.expand(b, n, -1), embeds[:, k:]], 1)
    mask = batch["attention_mask"]
    mask = torch.cat([mask[:, :k], mask.new_ones(b, n), mask[:, k:]], 1)
    extra = {"decoder_input_ids": batch["decoder_input_ids"]} if "decoder_input_ids" in batch else {}
    with torch.no_grad():
        out = frozen(inputs_embeds=embeds, attention_mask=mask, **extra)
    if getattr(out, "logits", None) is not None:
        logits = out.logits
        return torch.cat([logits[:, :k], logits[:, k + n:]], 1) if logits.dim() == 3 and not extra else logits
    h = out.last_hidden_state
    return torch.cat([h[:, :k], h[:, k + n:]], 1)


# ---------------------------------------------------------------- the independent formulation


@pytest.mark.parametrize("family", FOUR)
def test_prompted_model_equals_the_frozen_model_on_manually_concatenated_embeddings(family):
    model = tiny_model(family)
    frozen = copy.deepcopy(model)
    adapted = adapt(model)
    prompt = prompt_of(adapted)
    with torch.no_grad():
        prompt.prompt.normal_()  # a prompt far from any token embedding
    k = 1 if family.startswith("roberta") else 0  # BERT family: after [CLS]/<s>
    assert prompt.insert_at == k
    batch = inputs(family)
    got = output(model, batch)
    torch.testing.assert_close(got, manual(frozen, prompt.prompt.detach(), batch, k), rtol=1e-10, atol=1e-10)
    plain = output(frozen, batch)
    assert got.shape == plain.shape and (got - plain).abs().max() > 1e-3 * plain.abs().max()


def test_explicit_position_ids_count_real_tokens_and_are_shifted():
    model = tiny_model("gpt2")
    adapt(model)
    batch = inputs("gpt2")
    positions = torch.arange(batch["input_ids"].shape[1])[None].expand(2, -1)
    torch.testing.assert_close(output(model, {**batch, "position_ids": positions}), output(model, batch),
                               rtol=0, atol=0)


def test_gpt2_token_types_are_added_to_the_real_tokens_only():
    model = tiny_model("gpt2")
    frozen = copy.deepcopy(model)
    prompt = prompt_of(adapt(model)).prompt.detach()
    batch = inputs("gpt2")
    types = torch.full_like(batch["input_ids"], 250)
    wte = frozen.get_input_embeddings()
    embeds = torch.cat([prompt.expand(2, N, -1), wte(batch["input_ids"]) + wte(types)], 1)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), batch["attention_mask"]], 1)
    with torch.no_grad():
        want = frozen(inputs_embeds=embeds, attention_mask=mask).logits[:, N:]
    torch.testing.assert_close(output(model, {**batch, "token_type_ids": types}), want, rtol=1e-10, atol=1e-10)


def test_causal_lm_loss_scores_only_the_real_tokens():
    model = tiny_model("gpt2")
    frozen = copy.deepcopy(model)
    prompt = prompt_of(adapt(model)).prompt.detach()
    batch = inputs("gpt2")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    labels[:, :2] = IGNORE  # an unscored source part
    task = Task(OmegaConf.create({"name": "lm", "kind": "causal_lm", "num_labels": 0}), pad_token_id=0)
    loss, count = task.loss(model, {**batch, "labels": labels})
    logits = manual(frozen, prompt, batch, 0)  # (B, n, V): real positions only
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 256).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                           reduction="sum")  # the task's loss is in float32
    assert count == int((labels[:, 1:] != IGNORE).sum()) == 3 + 5  # row 0: tokens 2-4; row 1: 2-6
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- init, training, state


def test_vocab_init_copies_the_chosen_rows_of_common_tokens():
    torch.manual_seed(0)
    model = tiny_model("llama")
    table = model.get_input_embeddings().weight.detach().clone()
    prompt = prompt_of(adapt(model, length=40))
    ids = prompt.init_ids
    assert len(ids) == 40 and len(set(ids)) == 40 and all(0 <= i < 256 for i in ids)
    assert torch.equal(prompt.prompt.detach(), table[ids])
    ids = vocab_init_ids(300, 50_257)  # GPT-2's vocabulary: only the 5,000 lowest ids
    assert len(set(ids)) == 300 and max(ids) < 5000
    assert sorted(vocab_init_ids(10, 4)) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # longer than the pool: repeats


def test_text_init_repeats_the_tokens_to_the_length():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return {"input_ids": [ord(c) for c in text]}

    assert text_init_ids("abc", Tok(), 7) == [97, 98, 99, 97, 98, 99, 97]
    assert text_init_ids("abcdef", Tok(), 4) == [97, 98, 99, 100]


def test_text_init_with_the_gpt2_tokenizer_copies_the_text_embeddings():
    cfg = config("model=tiny_gpt2", "model.architecture.vocab_size=50257")
    model = load_model(cfg.model, "causal_lm", seed=0).eval()
    table = model.get_input_embeddings().weight.detach().clone()
    prompt = prompt_of(adapt(model, "method.components.prompt.init=text",
                             "method.components.prompt.init_text='positive or negative'",
                             f"method.components.prompt.tokenizer={GPT2_TOKENIZER}", length=4))
    ids = [24561, 393, 4633]  # GPT-2 BPE of "positive or negative"
    assert prompt.init_ids == ids + ids[:1]
    assert torch.equal(prompt.prompt.detach(), table[ids + ids[:1]])


def test_uniform_init_is_lesters_range():
    torch.manual_seed(0)
    comp = prompt_of(adapt(tiny_model("t5"), "method.components.prompt.init=uniform", length=200))
    values = comp.prompt.detach()
    assert comp.init_ids is None and values.abs().max() <= 0.5
    assert 0.27 < float(values.std()) < 0.31  # U[-0.5, 0.5]: std 1/√12 = 0.289


@pytest.mark.parametrize("family", ["roberta_cls", "t5"])
def test_only_the_prompt_trains(family):
    model = tiny_model(family).train()
    adapted = adapt(model)
    names = {n for n, _ in adapted.trainable_parameters()}
    head = {n for n in names if n.startswith("classifier")}  # RoBERTa's new task head: uncounted
    assert names - head == {"kpeft_prompt.prompt"}
    assert adapted.count().trainable == adapted.count().stored == N * 32
    # (the gradients reach exactly these, and a prompt does not merge: tests/test_matrix.py)


def test_adapter_state_round_trips_and_a_deep_copy_is_independent():
    model = tiny_model("t5")
    adapted = adapt(model)
    batch = inputs("t5")
    state = adapted.adapter_state_dict()
    assert list(state) == ["kpeft_prompt.prompt"] and state["kpeft_prompt.prompt"].shape == (N, 32)
    expected = output(model, batch)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        prompt_of(adapted).prompt.normal_()
    assert not torch.equal(output(model, batch), expected)
    assert torch.equal(output(twin, batch), expected)  # the copy's hooks prepend the copy's prompt
    adapted.load_adapter_state_dict(state)
    assert torch.equal(output(model, batch), expected)


def test_remove_restores_the_backbone():
    model = tiny_model("roberta_cls")
    frozen = copy.deepcopy(model)
    prompt = prompt_of(adapt(model))
    batch = inputs("roberta_cls")
    prompt.remove()
    assert "kpeft_prompt" not in dict(model.named_children())
    assert torch.equal(output(model, batch), output(frozen, batch))


# ---------------------------------------------------------------- decoding


def naive_greedy(model, prompt, steps, types=None, gen_type=None):
    ids, tt, out = list(prompt), None if types is None else list(types), []
    for _ in range(steps):
        kw = {"input_ids": torch.tensor([ids]), "use_cache": False}
        if tt is not None:
            kw["token_type_ids"] = torch.tensor([tt])
        nxt = int(model(**kw).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if tt is not None:
            tt.append(gen_type)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_cached_decoding_equals_unbatched_uncached(family):
    model = tiny_model(family)
    with torch.no_grad():
        prompt_of(adapt(model)).prompt.normal_()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (k,), generator=g).tolist() for k in (3, 8, 1, 5)]
    want = [naive_greedy(model, p, 6) for p in prompts]
    assert greedy_decode(model, prompts, max_new_tokens=6, pad_id=0, batch_size=4) == want
    if family == "gpt2":  # with task embeddings (token types), as the NLG tasks decode
        types = [[250] * len(p) for p in prompts]
        want = [naive_greedy(model, p, 5, t, 251) for p, t in zip(prompts, types)]
        assert greedy_decode(model, prompts, max_new_tokens=5, token_types=types, gen_token_type=251) == want


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_prompt_enters_the_kv_cache_once(family):
    """Prefill caches n + width rows, a cached step one more: the prompt is not prepended again
    (transformers >= 5.24 hands the base model `cache`, older releases `past_key_values`)."""
    model = tiny_model(family)
    adapt(model)
    name, ids = cache_arg(model), torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        assert getattr(out, name).get_seq_length() == N + 5 and out.logits.shape[1] == 5
        out = model(input_ids=ids[:, -1:], use_cache=True, **{name: getattr(out, name)})
    assert getattr(out, name).get_seq_length() == N + 6 and out.logits.shape[1] == 1


def test_seq2seq_decoding_runs_the_prompted_encoder_once_and_equals_a_full_rerun():
    from kpeft.training.decode import greedy_decode_seq2seq

    model = tiny_model("t5")
    with torch.no_grad():
        prompt_of(adapt(model)).prompt.normal_()
    g = torch.Generator().manual_seed(5)
    sources = [torch.randint(3, 256, (k,), generator=g).tolist() for k in (4, 7, 2)]
    want = []
    for x in sources:  # unbatched, uncached: the whole model on the full decoder prefix each step
        dec = [model.config.decoder_start_token_id]
        for _ in range(5):
            logits = model(input_ids=torch.tensor([x]), decoder_input_ids=torch.tensor([dec]), use_cache=False).logits
            dec.append(int(logits[0, -1].argmax()))
        want.append(dec[1:])
    assert greedy_decode_seq2seq(model, sources, max_new_tokens=5, pad_id=0) == want


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_changing_future_tokens_leaves_earlier_outputs_unchanged(family):
    # (left-padded generation = one by one, and padding: tests/test_matrix.py)
    model = tiny_model(family)
    with torch.no_grad():
        prompt_of(adapt(model)).prompt.normal_()
    check_future_tokens_do_not_leak(model, family)


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize(("args", "trainable", "line"), [
    (["model=gpt2", "method=prompt_tuning", "budget=tiny"], 92_160, "trainable 92,160 (0.07%)"),
    (["model=gpt2", "method=prompt_tuning", "budget=small"], 165_888, "trainable 165,888 (0.13%)"),
    (["model=t5_base", "method=prompt_tuning", "budget=t5_glue"], 153_600, "trainable 153,600 (0.07%)"),
])
def test_counts_are_length_times_width(args, trainable, line, capsys):
    record = count_main(args)  # 120 × 768, 216 × 768, 200 × 768
    assert record["trainable"] == record["stored"] == trainable
    assert line in capsys.readouterr().out.splitlines()


# ---------------------------------------------------------------- short trainings


@pytest.mark.parametrize(("model", "task"), [("tiny_gpt2", "demo_reverse"), ("tiny_t5", "demo_reverse_s2s")])
def test_a_short_training_run_completes(model, task, tmp_path):
    from kpeft.compose import compose
    from kpeft.train import run

    cfg = compose([f"model={model}", f"task={task}", "method=prompt_tuning", "budget=small",
                   "budget.prompt_tuning.length=4", "train.epochs=1", f"output_root={tmp_path}",
                   "train.progress=false", "task.options.n_train=64", "task.options.n_val=16", "task.options.n_test=16"])
    record = run(cfg)
    assert record["status"] == "complete" and record["training"]["steps"] == 2
    assert record["params"]["trainable"] == record["params"]["stored"] == 4 * 32
