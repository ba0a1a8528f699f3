"""Inputs longer than the model can read: the model's position limit, the truncation policy
(``task.truncation``) and its one warning.

* ``truncate`` (default): inputs are cut to ``min(task.max_length, the model's positions)``;
  text tasks cut the text (pairs: the longer text first, as the tokenizer's ``longest_first``);
  NLG tasks cut the source segments (longest first) and keep the target. One warning per split
  says how many examples were cut.
* ``error``: a ``task.max_length`` beyond the model's positions is refused at start, and an
  input longer than ``task.max_length`` is refused with the count of such examples.

Position limits come from the HF config: GPT-2's ``n_positions``, ``max_position_embeddings``
otherwise (RoBERTa: minus its padding offset); T5's relative positions have none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kpeft.errors import KpeftError

log = logging.getLogger("kpeft.tasks")

POLICIES = ("truncate", "error")
# Models whose position ids start after the padding index (positions pad_token_id + 1, ...).
_PADDING_OFFSET = ("roberta", "xlm-roberta", "camembert")


def max_positions(config) -> int | None:
    """How many input positions the model has (None: relative positions, no limit)."""
    model_type = getattr(config, "model_type", "")
    if model_type in ("t5", "mt5", "umt5"):
        return None
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not n:
        return None
    if model_type in _PADDING_OFFSET:
        n -= (getattr(config, "pad_token_id", None) or 1) + 1
    return int(n)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise KpeftError(f"task.truncation must be {' or '.join(POLICIES)}, not '{policy}'")
    return policy


def input_limit(max_length: int, positions: int | None, policy: str, model: str = "the model") -> int:
    """The longest input: ``task.max_length``, capped at the model's positions (``truncate``) or
    refused when beyond them (``error``)."""
    check_policy(policy)
    if max_length < 1:
        raise KpeftError(f"task.max_length must be ≥ 1, not {max_length}")
    if positions is not None and max_length > positions:
        if policy == "error":
            raise KpeftError(f"task.max_length={max_length} exceeds the {positions} positions of {model}; "
                             f"set task.max_length={positions} or task.truncation=truncate")
        return positions
    return max_length


def refuse_long(n_long: int, total: int, split: str, limit: int) -> KpeftError:
    return KpeftError(f"{n_long} of {total} {split} examples are longer than {limit} tokens "
                      f"(task.truncation=error); raise task.max_length within the model's positions "
                      "or set task.truncation=truncate")


def warn_truncated(counts: dict[str, tuple[int, int]], limit: int, what: str = "examples") -> None:
    """One warning for all splits: ``{split: (cut, total)}``; nothing when nothing was cut."""
    parts = [f"{cut} of {total} {split}" for split, (cut, total) in counts.items() if cut]
    if parts:
        log.warning("truncated %s %s to %d tokens (task.max_length and the model's positions; "
                    "task.truncation=error refuses instead)", ", ".join(parts), what, limit)


def cut_longest_first(lengths: Sequence[int], budget: int, floor: int = 1) -> list[int]:
    """New lengths with ``sum ≤ budget``, taking tokens from the longest first and leaving each at
    least `floor` (a segment's marker token); ``sum(lengths) ≤ budget`` returns them unchanged."""
    lengths = list(lengths)
    excess = sum(lengths) - budget
    if excess <= 0:
        return lengths
    # Water-filling: the largest cap c with sum(min(l, c)) ≤ budget.
    lo, hi = floor, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, max(mid, floor)) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    capped = [min(n, lo) if n > lo else n for n in lengths]
    spare = budget - sum(capped)
    for i, n in enumerate(lengths):  # hand leftover room back, in order, to the segments that were cut
        if spare <= 0:
            break
        if n > capped[i]:
            extra = min(spare, n - capped[i])
            capped[i] += extra
            spare -= extra
    return capped
