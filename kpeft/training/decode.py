"""Batched greedy decoding with a KV cache for causal LMs (SPEC §10.4).

:func:`greedy_decode` left-pads the prompts, passes an explicit attention mask and position ids
(``cumsum(mask) - 1``, so every prompt starts at position 0 as it would alone), optional token-type
ids (GPT-2's task embeddings: the prompt's own, then ``gen_token_type`` for every generated token),
and decodes with the cache: one forward over the prompts, then one token per step. A sequence stops
when it produces any of ``stop_ids`` (the task's special tokens; the stop token is not returned) or
after ``max_new_tokens``. It gives the tokens of an unbatched, uncached loop that re-encodes the
whole prefix at each step (``tests/test_decode.py``), for merged and unmerged LoRA, GPT-2 and Llama.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


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
    past = None
    step_ids, step_pos, step_tt = ids, positions, tt
    for _ in range(max_new_tokens):
        kwargs = {"input_ids": step_ids, "attention_mask": mask, "position_ids": step_pos, "use_cache": True}
        if step_tt is not None:
            kwargs["token_type_ids"] = step_tt
        if past is not None:
            kwargs["past_key_values"] = past
        out = model(**kwargs)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
        is_stop = torch.isin(nxt, stop_t) if stop_t is not None else torch.zeros_like(done)
        for i in torch.nonzero(~done & ~is_stop).flatten().tolist():
            result[i].append(int(nxt[i]))
        done |= is_stop
        if bool(done.all()):
            break
        nxt = nxt.masked_fill(done, pad_id)
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        if step_tt is not None:  # generated tokens: gen_token_type, or the prompt's last type
            step_tt = step_tt[:, -1:] if gen_type is None else torch.full_like(step_tt[:, -1:], gen_type)
    return result
