"""``python -m kpeft.count model=M method=X budget=B``: parameter accounting, offline.

Builds the backbone on the meta device from the architecture numbers in ``conf/model`` (no
weights, no network), installs the method, and prints the papers' "parameters to train / store"
columns; the last stdout line is one JSON object (docs/cli.md contract)::

    {"model", "method", "budget", "total", "trainable", "stored", "trainable_pct", "stored_pct"}

Percentages are of the backbone's own parameters, before the method (GPT-2 small: 124,439,808).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from omegaconf import DictConfig

from kpeft.backbones import HEADS_OF_FAMILY, describe
from kpeft.backbones.loading import load_model
from kpeft.budget_match import MATCH
from kpeft.compose import compose
from kpeft.errors import user_errors
from kpeft.methods import ParamCount, apply_method


def count_parameters(cfg: DictConfig) -> ParamCount:
    """Count `cfg.method` on `cfg.model` (meta device: instant, no memory)."""
    head = HEADS_OF_FAMILY[cfg.model.family][0]
    model = load_model(cfg.model, head, meta=True)
    return apply_method(model, describe(model), cfg.method, cfg.fidelity).count()


def count_record(cfg: DictConfig, count: ParamCount) -> dict:
    return {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "budget": cfg.budget.name,
        "total": count.total,
        "trainable": count.trainable,
        "stored": count.stored,
        "trainable_pct": round(count.trainable_pct, 4),
        "stored_pct": round(count.stored_pct, 4),
    }


def format_count(cfg: DictConfig, count: ParamCount) -> str:
    return "\n".join(
        [
            f"model={cfg.model.name} method={cfg.method.name} budget={cfg.budget.name}",
            *_solved_sizes(cfg),
            f"total {count.total:,}",
            f"trainable {count.trainable:,} ({count.trainable_pct:.2f}%)",
            f"stored {count.stored:,} ({count.stored_pct:.2f}%)",
        ]
    )


def _solved_sizes(cfg: DictConfig) -> list[str]:
    """``budget=match``: the sizes solved for the target (kpeft/budget_match.py)."""
    if cfg.budget.name != MATCH or cfg.budget.get(cfg.method.name) is None:
        return []
    sizes = ", ".join(f"{k}={v}" for k, v in cfg.budget[cfg.method.name].items())
    return [f"sizes {sizes} (solved for budget.target={cfg.budget.target})"]


@user_errors
def main(argv: Sequence[str] | None = None) -> dict:
    cfg = compose(sys.argv[1:] if argv is None else argv)
    count = count_parameters(cfg)
    print(format_count(cfg, count))
    record = count_record(cfg, count)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
