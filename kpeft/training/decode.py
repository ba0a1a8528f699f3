"""Batched greedy decoding with a KV cache: causal LMs ([KM] App. B.2) and encoder-decoders (T5).

:func:`greedy_decode` (causal LMs) left-pads the prompts, passes an explicit attention mask and
position ids (``cumsum(mask) - 1``, so every prompt starts at position 0 as it would alone),
optional token-type ids (GPT-2's task embeddings: the prompt's own, then ``gen_token_type`` for
every generated token), and decodes with the cache: one forward over the prompts, then one token
per step. A sequence stops when it produces any of ``stop_ids`` (the task's special tokens; the
stop token is not returned) or after ``max_new_tokens``. It gives the tokens of an unbatched,
uncached loop that re-encodes the whole prefix at each step (``tests/test_decode.py``), for merged
and unmerged LoRA, GPT-2 and Llama.

:func:`greedy_decode_seq2seq` (T5) right-pads the inputs, runs the encoder once per batch, then
the decoder from ``decoder_start_token_id`` one token per step with its self-attention cache (the
cross-attention keys/values are computed at the first step and cached too), stopping at
``stop_ids`` (T5's eos) or after ``max_new_tokens``. It gives the tokens of an unbatched loop that
re-runs the whole model on the full decoder prefix at each step (``tests/test_decode_seq2seq.py``).

Both run under ``torch.nn.utils.parametrize.cached()``: a reparameterised weight (SAID's
``θ_0 + λ_i P(θ^d)_i``) is formed once per call instead of once per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from torch.nn.utils import parametrize

from kpeft.backbones.cache_api import cache_arg


# Parametrized weights (SAID) are formed once per call, not once per generated token.
@parametrize.cached()
@torch.no_grad()
def greedy_decode(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 40,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    token_types: Sequence[Sequence[int]] | None = None,
    gen_token_type: int | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations of `prompts` (lists of token ids), each without its stop token."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        types = None if token_types is None else token_types[start : start + batch_size]
        out += _decode_batch(model, chunk, types, max_new_tokens, set(stop_ids), pad_id, gen_token_type)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _greedy_step(logits: torch.Tensor, done: torch.Tensor, stop_t: torch.Tensor | None,
                 result: list[list[int]], pad_id: int) -> torch.Tensor | None:
    """One greedy step of a batch: the last position's argmax is appended to every unfinished
    row's result, rows that produce a stop token finish (``done`` is updated in place). Returns the
    next input tokens (finished rows get ``pad_id``), or None when every row has finished."""
    nxt = logits[:, -1].argmax(-1)
    is_stop = torch.isin(nxt, stop_t) if stop_t is not None else torch.zeros_like(done)
    tokens = nxt.tolist()  # one device sync per step
    for i in torch.nonzero(~done & ~is_stop).flatten().tolist():
        result[i].append(tokens[i])
    done |= is_stop
    if bool(done.all()):
        return None
    return nxt.masked_fill(done, pad_id)


def _decode_batch(model, prompts, types, max_new_tokens, stop, pad_id, gen_type) -> list[list[int]]:
    device = _device(model)
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    tt = torch.full((n, width), pad_id, dtype=torch.long, device=device) if types is not None else None
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
        if tt is not None:
            tt[i, width - len(p):] = torch.tensor(list(types[i]), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    result: list[list[int]] = [[] for _ in range(n)]
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device) if stop else None
    past, cache_name = None, cache_arg(model)
    step_ids, step_pos, step_tt = ids, positions, tt
    # Only the last position's logits are read: the LM head skips the prompt (transformers ≥ 4.50).
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for _ in range(max_new_tokens):
        kwargs = {"input_ids": step_ids, "attention_mask": mask, "position_ids": step_pos, "use_cache": True,
                  **last_only}
        if step_tt is not None:
            kwargs["token_type_ids"] = step_tt
        if past is not None:
            kwargs[cache_name] = past
        out = model(**kwargs)
        past = getattr(out, cache_name)
        nxt = _greedy_step(out.logits, done, stop_t, result, pad_id)
        if nxt is None:
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        if step_tt is not None:  # generated tokens: gen_token_type, or the prompt's last type
            step_tt = step_tt[:, -1:] if gen_type is None else torch.full_like(step_tt[:, -1:], gen_type)
    return result


@parametrize.cached()
@torch.no_grad()
def greedy_decode_seq2seq(
    model,
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 10,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy outputs of an encoder-decoder for `inputs` (lists of token ids), each without its
    stop token. ``decoder_start_id`` defaults to the model's ``decoder_start_token_id``."""
    if decoder_start_id is None:
        config = model.config
        decoder_start_id = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad_id
    out: list[list[int]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        out += _decode_seq2seq_batch(model, chunk, max_new_tokens, set(stop_ids), pad_id, decoder_start_id)
    return out


def _decode_seq2seq_batch(model, inputs, max_new_tokens, stop, pad_id, start_id) -> list[list[int]]:
    device = _device(model)
    n, width = len(inputs), max(len(x) for x in inputs)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, x in enumerate(inputs):  # right padding: the encoder's relative positions ignore it
        ids[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[i, : len(x)] = 1
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    result: list[list[int]] = [[] for _ in range(n)]
    stop_t = torch.tensor(sorted(stop), dtype=torch.long, device=device) if stop else None
    step = torch.full((n, 1), start_id, dtype=torch.long, device=device)
    past, cache_name = None, cache_arg(model)
    for _ in range(max_new_tokens):
        out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=step,
                    use_cache=True, **{cache_name: past})
        past = getattr(out, cache_name)
        nxt = _greedy_step(out.logits, done, stop_t, result, pad_id)
        if nxt is None:
            break
        step = nxt[:, None]
    return result


# ---------------------------------------------------------------- greedy or beam (docs/decoding.md)
def by_length(run, prompts: Sequence[Sequence[int]], kwargs: dict) -> list[list[int]]:
    """``run(prompts, kwargs)`` on the prompts sorted by length (longest first, so a batch pads
    little), the outputs returned in the original order (``token_types`` are reordered alike).
    Batched decoding gives every prompt the tokens it gets alone, so the order changes no output."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    kw = dict(kwargs)
    if kw.get("token_types") is not None:
        kw["token_types"] = [kw["token_types"][i] for i in order]
    outputs = run([prompts[i] for i in order], kw)
    result: list[list[int]] = [[] for _ in prompts]
    for j, i in enumerate(order):
        result[i] = outputs[j]
    return result


def decode(model, prompts: Sequence[Sequence[int]], settings=None, **kwargs) -> list[list[int]]:
    """Continuations of `prompts` under ``settings`` (a :class:`~kpeft.training.beam.DecodeSettings`;
    None = greedy): :func:`greedy_decode` for one beam, else :func:`~kpeft.training.beam.beam_decode`,
    the prompts decoded longest first (:func:`by_length`).
    ``kwargs`` are theirs (``max_new_tokens``, ``stop_ids``, ``pad_id``, ``token_types``, ...)."""
    from kpeft.training.beam import beam_decode

    if settings is None or settings.greedy:
        return by_length(lambda p, kw: greedy_decode(model, p, **kw), prompts, kwargs)
    return by_length(lambda p, kw: beam_decode(model, p, settings, **kw), prompts, kwargs)


def decode_seq2seq(model, inputs: Sequence[Sequence[int]], settings=None, **kwargs) -> list[list[int]]:
    """As :func:`decode` for an encoder-decoder: :func:`greedy_decode_seq2seq` or
    :func:`~kpeft.training.beam.beam_decode_seq2seq`, inputs sorted by length."""
    from kpeft.training.beam import beam_decode_seq2seq

    if settings is None or settings.greedy:
        return by_length(lambda p, kw: greedy_decode_seq2seq(model, p, **kw), inputs, kwargs)
    return by_length(lambda p, kw: beam_decode_seq2seq(model, p, settings, **kw), inputs, kwargs)
