"""AdamW and the learning-rate schedule ([KM] App. B.2, [IT] App. B.2): linear warm-up from 0, then linear decay to 0."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], tcfg: DictConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors; biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in named_params:
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps)


def warmup_steps(tcfg: DictConfig, total_steps: int) -> int:
    return tcfg.warmup_steps if tcfg.warmup_steps > 0 else int(round(tcfg.warmup_ratio * total_steps))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """lr · t/warmup during warm-up, then lr · (total − t)/(total − warmup), floored at 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)
