"""``budget=match budget.target=<count or %>``: a method's sizes solved on the current backbone.

The papers match budgets by hand: each method's sizes are tuned until its trained-parameter count
(the parameters kept after training) is close to the others' (Kernel-mix Table B.5, Inducer-tuning Table 5, He et al. 2022 Table 1).
On a new backbone this module does it: every sized method has a one-knob family of sizes
(:data:`SIZE_FAMILIES`, e.g. LoRA's rank, an adapter's bottleneck, every Kernel-mix rank at once),
its count is monotone in the knob, and the knob whose count is closest to the target is found by
doubling then bisection, counting on the meta device (``kpeft.count``: no weights, no memory).

The solved sizes are written into ``budget.<method>`` during composition (kpeft/compose_hook.py),
so the printed, saved and recorded config holds them; ``budget.achieved`` is the count reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig, open_dict

from kpeft.errors import KpeftError

log = logging.getLogger(__name__)

MATCH = "match"


def _same(*keys: str) -> Callable[[int], dict[str, int]]:
    return lambda v: dict.fromkeys(keys, v)


# One knob per method; every size of the family grows with it (count monotone in the knob).
SIZE_FAMILIES: dict[str, Callable[[int], dict[str, int]]] = {
    "lora": _same("r"),
    "adapter": _same("bottleneck"),
    "parallel_adapter": _same("bottleneck"),
    "compacter": _same("bottleneck"),
    "mh_parallel_adapter": _same("bottleneck"),
    "prefix": _same("length"),
    "prompt_tuning": _same("length"),
    "said": _same("d"),
    "inducer": _same("r_k", "r_v"),
    "inducer_adaptive": lambda v: {"r_k": 0, "r_v": v},
    "inducer_extension": lambda v: {"r_k": 0, "r_v": v},
    "inducer_lora": _same("r_k", "r_v", "lora_r"),
    "mam_adapter": _same("prefix_length", "bottleneck"),
    "mam_inducer": _same("r_k", "r_v", "lora_r", "bottleneck"),
    "kernel_mix_qvo": _same("q_wise", "q_lora", "v_wise", "v_lora", "o_wise", "o_lora"),
    "kernel_mix_lite_qv": _same("q_wise", "q_lora", "v_wise", "v_lora"),
    "kernel_wise_lite_qv": _same("q_wise", "v_wise"),
    "kernel_wise_qvo": _same("q_wise", "v_wise", "o_wise"),
    "kernel_wise_mq": _same("q_wise", "v_wise"),
    "kernel_wise_mv": _same("q_wise", "v_wise"),
}
KNOB_LIMIT = 1 << 26  # SAID's d reaches millions; nothing else comes near


def target_count(target: object, backbone_total: int) -> int:
    """``460800`` → 460,800; ``"0.34%"`` → 0.34% of the backbone's own parameters."""
    text = str(target).strip().replace(",", "").replace("_", "")
    try:
        value = float(text[:-1]) * backbone_total / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise KpeftError(f"budget.target={target!r} is not a positive count or percentage; "
                         "give e.g. budget.target=460800 or budget.target=0.34%")
    return round(value)


def _refine(cfg: DictConfig, method: str, sizes: dict[str, int], target: int) -> dict[str, int]:
    """Greedy ±1 steps on one size (or +1 on one and −1 on another) of a several-size family while
    one brings the count closer
    (Inducer-tuning + LoRA's r_k, r_v and LoRA rank need not be equal); each size stays at or
    above its value in the family's smallest member (a size the family keeps at 0 stays 0)."""
    floor = SIZE_FAMILIES[method](1)
    if len(sizes) == 1:
        return sizes
    error = abs(_count_sizes(cfg, method, sizes)[0] - target)
    while error:
        free = [key for key in sizes if floor[key] > 0]  # a 0 in the family is fixed
        steps = [{**sizes, key: sizes[key] + step} for key in free for step in (-1, 1)
                 if sizes[key] + step >= floor[key]]
        steps += [{**sizes, up: sizes[up] + 1, down: sizes[down] - 1} for up in free for down in free
                  if up != down and sizes[down] - 1 >= floor[down]]  # trade one size for another
        scored = [(abs(_count_sizes(cfg, method, s)[0] - target), i) for i, s in enumerate(steps)]
        if not scored or min(scored)[0] >= error:
            break
        error, pick = min(scored)
        sizes = steps[pick]
    return sizes


def _count(cfg: DictConfig, method: str, knob: int) -> tuple[int, int]:
    return _count_sizes(cfg, method, SIZE_FAMILIES[method](knob))


def _count_sizes(cfg: DictConfig, method: str, sizes: dict[str, int]) -> tuple[int, int]:
    """(stored count, backbone total) with `method`'s sizes set from `knob`. Stored, the papers'
    budget column: it equals the trained count except for re-parameterised prefixes, whose
    training-time MLP is dropped after training (Li & Liang 2021, Sec. 4.3)."""
    from kpeft.count import count_parameters

    section = cfg.budget[method]
    for key, value in sizes.items():
        section[key] = value
    count = count_parameters(cfg)
    return count.stored, count.total


def solve(cfg: DictConfig) -> DictConfig:
    """Set ``budget.<method>`` to the sizes whose count is closest to ``budget.target`` (the
    smaller on a tie) and ``budget.achieved`` to that count; a no-op for other budgets."""
    if cfg.budget.name != MATCH:
        return cfg
    method = str(cfg.method.name)
    if cfg.budget.get("target") is None:
        return cfg  # kpeft.compose.check_method_fits_budget says so in one line
    if method not in SIZE_FAMILIES:
        if method in cfg.budget and cfg.budget[method] is not None:
            raise KpeftError(f"budget=match cannot size method '{method}' (its sizes are shapes); set them "
                             f"with budget.{method}.… or use another budget")
        return cfg  # a size-free method (bitfit, finetune, zero_shot): its count is what it is
    low, (count, total) = 1, _count(cfg, method, 1)
    target = target_count(cfg.budget.target, total)
    high, high_count = low, count
    while high_count < target and high < KNOB_LIMIT:  # doubling: the first knob at or over the target
        low, count = high, high_count
        high *= 2
        high_count = _count(cfg, method, high)[0]
    while high - low > 1:  # bisection keeps count(low) < target <= count(high)
        mid = (low + high) // 2
        mid_count = _count(cfg, method, mid)[0]
        if mid_count < target:
            low, count = mid, mid_count
        else:
            high, high_count = mid, mid_count
    best = high if high_count >= target and abs(high_count - target) < abs(count - target) else low
    sizes = _refine(cfg, method, SIZE_FAMILIES[method](best), target)
    achieved = _count_sizes(cfg, method, sizes)[0]
    with open_dict(cfg.budget):
        cfg.budget.achieved = achieved
    log.info("budget=match: %s sizes %s give %s stored parameters (target %s)", method, sizes,
             f"{achieved:,}", f"{target:,}")
    return cfg
