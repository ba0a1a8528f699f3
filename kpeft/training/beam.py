"""Batched beam search with a KV cache, for causal LMs and encoder-decoders (``docs/decoding.md``).

:func:`beam_decode` (causal LMs: left padding, position ids, GPT-2 token types as in
:func:`~kpeft.training.decode.greedy_decode`) and :func:`beam_decode_seq2seq` (T5) run the prompts
once, repeat the cache ``num_beams`` times (``Cache.batch_repeat_interleave``), then decode one
token per step for all ``batch × num_beams`` hypotheses, reordering the cache by the surviving
beams' indices (``Cache.reorder_cache``) after each step.

:func:`beam_search` is transformers' vectorised beam search (``GenerationMixin._beam_search``,
transformers 5.x) on kpeft's own model calls: float32 log-probabilities, the top
``max(2, 1 + #stop ids)·num_beams`` continuations per item, hypotheses finished by a stop id (or by
reaching ``max_new_tokens``) scored ``Σ log p / L^length_penalty`` with ``L`` the generated length
(stop token included), and ``early_stopping`` ``False`` (transformers' heuristic), ``True`` (stop
once ``num_beams`` hypotheses are finished) or ``"never"`` (the canonical search). The returned
sequence is the best finished hypothesis without its stop token, so the tokens equal
``model.generate(num_beams, length_penalty, no_repeat_ngram_size, early_stopping,
max_new_tokens, eos_token_id=stop_ids, do_sample=False)`` (``tests/test_beam.py``).

``no_repeat_ngram_size = n`` bans, per hypothesis, every token that would repeat an n-gram of the
prompt + the tokens generated so far (transformers' ``NoRepeatNGramLogitsProcessor``; the prompt
of a seq2seq model is the decoder start token), computed for all hypotheses at once; left padding
never forms n-grams.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize
from transformers.modeling_outputs import BaseModelOutput

from kpeft.errors import KpeftError

EARLY_STOPPING = (True, False, "never")
NEG = -1.0e9  # transformers' "impossible" score


@dataclass(frozen=True)
class DecodeSettings:
    """How sequences are decoded: greedy (``num_beams=1``, the papers' protocol) or beam search."""

    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool | str = False
    max_new_tokens: int | None = None  # None: the task's own default

    def __post_init__(self):
        if self.num_beams < 1:
            raise KpeftError(f"decode.num_beams must be >= 1 (1 = greedy), got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise KpeftError(
                f"decode.no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.no_repeat_ngram_size and self.num_beams == 1:
            raise KpeftError("decode.no_repeat_ngram_size needs beam search: set decode.num_beams >= 2 "
                             "(greedy decoding is the papers' plain protocol)")
        if self.early_stopping not in EARLY_STOPPING:
            raise KpeftError(
                f"decode.early_stopping must be true, false or never, not {self.early_stopping!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise KpeftError(
                f"decode.max_new_tokens must be >= 1 (or null: the task's), got {self.max_new_tokens}")

    @classmethod
    def from_config(cls, cfg) -> DecodeSettings:
        """From the ``decode`` config section (None or missing keys: the defaults)."""
        if cfg is None:
            return cls()
        stopping = cfg.get("early_stopping", False)
        if isinstance(stopping, str) and stopping.lower() in ("true", "false"):
            stopping = stopping.lower() == "true"
        max_new = cfg.get("max_new_tokens")
        return cls(int(cfg.get("num_beams", 1)), float(cfg.get("length_penalty", 1.0)),
                   int(cfg.get("no_repeat_ngram_size", 0)), stopping,
                   None if max_new is None else int(max_new))

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1

    def tokens(self, task_default: int) -> int:
        """The number of new tokens: ``decode.max_new_tokens``, else the task's default."""
        return int(self.max_new_tokens) if self.max_new_tokens is not None else int(task_default)

    def generate_kwargs(self) -> dict:
        """The ``model.generate`` settings that decode the same tokens."""
        out = {"num_beams": self.num_beams, "do_sample": False}
        if not self.greedy:
            out.update(length_penalty=self.length_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size,
                       early_stopping=self.early_stopping)
        return out


# ---------------------------------------------------------------- the search
def banned_ngram_mask(seq: torch.Tensor, valid: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """``(rows, vocab)`` True where a token would complete an n-gram already in the row.

    `seq` ``(rows, L)`` tokens, `valid` ``(rows, L)`` False at padding (never part of an n-gram)."""
    rows, length = seq.shape
    banned = torch.zeros(rows, vocab, dtype=torch.bool, device=seq.device)
    if length < n:
        return banned
    windows = seq.unfold(1, n, 1)  # (rows, L-n+1, n)
    ok = valid.unfold(1, n, 1).all(-1)
    last = seq[:, length - n + 1:]  # the row's last n-1 tokens
    match = ok & (windows[..., : n - 1] == last[:, None, :]).all(-1)
    r, w = torch.nonzero(match, as_tuple=True)
    banned[r, windows[r, w, n - 1]] = True
    return banned


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j], ...]`` for (batch, beam, ...) tensors."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(
    first_logits: torch.Tensor,
    advance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    settings: DecodeSettings,
    max_new_tokens: int,
    stop_t: torch.Tensor | None,
    context: torch.Tensor,
    context_valid: torch.Tensor,
) -> list[list[int]]:
    """The best hypothesis of each item, without its stop token.

    `first_logits` ``(B·K, V)``: the next-token logits of every hypothesis (the prompt's, repeated
    K times). ``advance(tokens (B·K,), beam_idx (B·K,))`` reorders the model's cache by
    ``beam_idx`` (flat hypothesis indices), feeds ``tokens`` and returns the next logits.
    `context`/`context_valid` ``(B·K, P)``: each hypothesis's prompt (n-gram bans only)."""
    k, lp, stopping = settings.num_beams, settings.length_penalty, settings.early_stopping
    rows, vocab = first_logits.shape
    b, device = rows // k, first_logits.device
    keep = max(2, 1 + (0 if stop_t is None else stop_t.numel())) * k
    top_mask = torch.arange(keep, device=device) < k
    run_seq = torch.full((b, k, max_new_tokens), -1, dtype=torch.long, device=device)
    seqs = run_seq.clone()
    run_scores = torch.zeros((b, k), dtype=torch.float, device=device)
    run_scores[:, 1:] = NEG  # only the first copy of each prompt expands at step 0
    fin_scores = torch.full((b, k), NEG, dtype=torch.float, device=device)
    fin = torch.zeros((b, k), dtype=torch.bool, device=device)
    improvable = torch.ones((b, 1), dtype=torch.bool, device=device)
    offsets = torch.arange(b, device=device)[:, None] * k
    logits = first_logits
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        if settings.no_repeat_ngram_size:
            gen = run_seq[:, :, :t].reshape(rows, t)
            seq = torch.cat([context, gen], dim=1)
            valid = torch.cat([context_valid, torch.ones_like(gen, dtype=torch.bool)], dim=1)
            banned = banned_ngram_mask(seq, valid, settings.no_repeat_ngram_size, vocab)
            logp = logp.masked_fill(banned, -float("inf"))
        acc = (logp.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
        top_lp, top_idx = torch.topk(acc, keep)
        src, tok = top_idx // vocab, top_idx % vocab
        top_seq = _gather(run_seq, src)
        top_seq[:, :, t] = tok
        hits = torch.isin(tok, stop_t) if stop_t is not None else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 >= max_new_tokens:
            hits = torch.ones_like(hits)
        # the K best unfinished continuations run on
        run_lp = top_lp + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_lp, k)[1]
        run_seq, run_scores, run_src = _gather(top_seq, nxt), _gather(run_lp, nxt), _gather(src, nxt)
        # the finished ones compete with the kept hypotheses (in transformers' order of operations)
        just = hits & top_mask[None, :]
        cand = top_lp / ((t + 1) ** lp)
        cand += (fin.all(-1, keepdim=True) & (stopping is True)).to(torch.float32) * NEG
        cand += (~improvable).to(torch.float32) * NEG
        cand += (~just) * NEG
        best = torch.topk(torch.cat([fin_scores, cand], 1), k)[1]
        seqs = _gather(torch.cat([seqs, top_seq], 1), best)
        fin_scores = _gather(torch.cat([fin_scores, cand], 1), best)
        fin = _gather(torch.cat([fin, just], 1), best)
        # can a running hypothesis still beat the worst kept one?
        length = max_new_tokens if (stopping == "never" and lp > 0.0) else t + 1
        best_running = run_scores[:, :1] / (length ** lp)
        worst = torch.where(fin, torch.min(fin_scores, dim=1, keepdim=True)[0], NEG)
        improvable = improvable & torch.any(best_running > worst, dim=-1, keepdim=True)
        more = bool(improvable.any()) and not (bool(fin.all()) and stopping is True) and not bool(hits.all())
        if not more:
            break
        logits = advance(run_seq[:, :, t].reshape(rows), (run_src + offsets).reshape(rows))
    return [_strip(s, stop_t) for s in seqs[:, 0].tolist()]


def _strip(tokens: list[int], stop_t: torch.Tensor | None) -> list[int]:
    stops = set() if stop_t is None else set(stop_t.tolist())
    out = []
    for tok in tokens:
        if tok < 0 or tok in stops:
            break
        out.append(tok)
    return out


def _stop_tensor(stop: Iterable[int], device) -> torch.Tensor | None:
    stop = sorted(set(stop))
    return torch.tensor(stop, dtype=torch.long, device=device) if stop else None


# ---------------------------------------------------------------- causal LMs
def left_pad(prompts: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None, pad_id: int, device):
    """``(ids, mask, token types or None)``, each ``(n, width)``, left-padded."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    tt = torch.full((n, width), pad_id, dtype=torch.long, device=device) if types is not None else None
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
        if tt is not None:
            tt[i, width - len(p):] = torch.tensor(list(types[i]), dtype=torch.long)
    return ids, mask, tt


@parametrize.cached()
@torch.no_grad()
def beam_decode(
    model,
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings,
    *,
    max_new_tokens: int = 40,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    token_types: Sequence[Sequence[int]] | None = None,
    gen_token_type: int | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """Beam-search continuations of `prompts` (each without its stop token); `batch_size` prompts
    (× ``num_beams`` hypotheses) at a time."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        types = None if token_types is None else token_types[start : start + batch_size]
        out += _beam_batch(model, chunk, types, settings, max_new_tokens, stop_ids, pad_id, gen_token_type)
    return out


def _beam_batch(model, prompts, types, settings, max_new_tokens, stop, pad_id, gen_type) -> list[list[int]]:
    device = next(model.parameters()).device
    k = settings.num_beams
    ids, mask, tt = left_pad(prompts, types, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:  # the prompt's last position only
        kwargs["logits_to_keep"] = 1
    if tt is not None:
        kwargs["token_type_ids"] = tt
    out = model(**kwargs)
    past = out.past_key_values
    past.batch_repeat_interleave(k)
    first = out.logits[:, -1].repeat_interleave(k, 0)
    state = {"mask": mask.repeat_interleave(k, 0), "pos": positions[:, -1:].repeat_interleave(k, 0)}
    step_tt = None
    if tt is not None:  # generated tokens: gen_token_type, or the prompt's last type
        step_tt = tt[:, -1:] if gen_type is None else torch.full_like(tt[:, -1:], gen_type)
        step_tt = step_tt.repeat_interleave(k, 0)

    def advance(tokens: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
        past.reorder_cache(beam_idx)  # mask, positions and types are equal across an item's beams
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        state["pos"] = state["pos"] + 1
        step = {"input_ids": tokens[:, None], "attention_mask": state["mask"], "position_ids": state["pos"],
                "past_key_values": past, "use_cache": True}
        if step_tt is not None:
            step["token_type_ids"] = step_tt
        return model(**step).logits[:, -1]

    context, valid = ids.repeat_interleave(k, 0), mask.bool().repeat_interleave(k, 0)
    return beam_search(first, advance, settings, max_new_tokens, _stop_tensor(stop, device), context, valid)


# ---------------------------------------------------------------- encoder-decoders
@parametrize.cached()
@torch.no_grad()
def beam_decode_seq2seq(
    model,
    inputs: Sequence[Sequence[int]],
    settings: DecodeSettings,
    *,
    max_new_tokens: int = 10,
    stop_ids: Iterable[int] = (),
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    batch_size: int = 16,
) -> list[list[int]]:
    """Beam-search outputs of an encoder-decoder for `inputs`, each without its stop token."""
    if decoder_start_id is None:
        config = model.config
        start = config.decoder_start_token_id
        decoder_start_id = start if start is not None else pad_id
    out: list[list[int]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        out += _beam_seq2seq_batch(model, chunk, settings, max_new_tokens, stop_ids, pad_id, decoder_start_id)
    return out


def _beam_seq2seq_batch(model, inputs, settings, max_new_tokens, stop, pad_id, start_id) -> list[list[int]]:
    device = next(model.parameters()).device
    k = settings.num_beams
    n, width = len(inputs), max(len(x) for x in inputs)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, x in enumerate(inputs):  # right padding, as in greedy_decode_seq2seq
        ids[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[i, : len(x)] = 1
    hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    encoded = BaseModelOutput(last_hidden_state=hidden.repeat_interleave(k, 0))
    mask = mask.repeat_interleave(k, 0)
    start = torch.full((n * k, 1), start_id, dtype=torch.long, device=device)
    out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=start, use_cache=True)
    past = out.past_key_values

    def advance(tokens: torch.Tensor, beam_idx: torch.Tensor) -> torch.Tensor:
        past.reorder_cache(beam_idx)
        return model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens[:, None],
                     past_key_values=past, use_cache=True).logits[:, -1]

    valid = torch.ones_like(start, dtype=torch.bool)
    stop_t = _stop_tensor(stop, device)
    return beam_search(out.logits[:, -1], advance, settings, max_new_tokens, stop_t, start, valid)


__all__ = ["DecodeSettings", "beam_decode", "beam_decode_seq2seq", "beam_search", "banned_ngram_mask"]
