"""Saved adapters back as weight updates: load a run's best checkpoint into its backbone and list,
per adapted attention matrix, the frozen W and the method's own ``ΔW`` (the sum of the
``delta_weight()`` of the branches that ``merge()`` would fold in; row convention)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.errors import KpeftError
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.base import AdaptedProjection, WeightComponent
from kpeft.methods.lowrank import LoRA
from kpeft.training.checkpoint import ADAPTER_FILE, read_adapter_file, read_config_file

RETRAIN = "train the run again (python -m kpeft.train ... force=true) or pass another run"

HEADS_OF_KIND = {"classification": "classification", "causal_lm": "causal_lm", "seq2seq": "seq2seq"}


def checkpoint_dir(path: str | Path) -> Path:
    """A run directory (its ``checkpoints/best``) or a checkpoint directory itself."""
    path = Path(path)
    for cand in (path / "checkpoints" / "best", path):
        if (cand / ADAPTER_FILE).exists() and (cand / "config.yaml").exists():
            return cand
    raise KpeftError(
        f"'{path}' holds no saved adapter: pass a run directory (with checkpoints/best/) or a checkpoint "
        f"directory with {ADAPTER_FILE} and config.yaml"
    )


def load_run(path: str | Path) -> tuple[DictConfig, AdaptedModel]:
    """The run's config and its backbone (rebuilt as training built it) with the saved adapter.

    Only the method's own tensors are loaded (task heads and task-embedding rows are not needed)."""
    ckpt = checkpoint_dir(path)
    cfg = read_config_file(ckpt / "config.yaml", RETRAIN)
    head = HEADS_OF_KIND.get(OmegaConf.select(cfg, "task.kind"))
    if head is None:
        raise KpeftError(f"{ckpt / 'config.yaml'}: no known task.kind; {RETRAIN}")
    model = load_model(cfg.model, head, num_labels=cfg.task.num_labels, seed=cfg.seed)
    adapted = apply_method(model, describe(model), cfg.method, cfg.get("fidelity", "paper"))
    state = read_adapter_file(ckpt / ADAPTER_FILE, RETRAIN)
    own = {id(p) for comp in adapted.all_components() for p in comp.parameters()}
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in own:
                if name not in state:
                    missing.append(name)
                else:
                    param.copy_(state[name])
    if missing:
        raise KpeftError(f"{ckpt / ADAPTER_FILE} lacks {len(missing)} of the method's tensors (e.g. {missing[0]}); "
                         "was it written by another method config?")
    return cfg, adapted


@dataclass
class MatrixUpdate:
    """One adapted attention matrix: frozen W and ΔW in row convention ``(d_in, d_out)``."""

    layer: int  # index into the anatomy's layers (T5: encoder layers first, then decoder)
    stack: str
    attention: str  # self | cross
    matrix: str  # q | k | v | o
    weight: torch.Tensor
    delta: torch.Tensor
    branches: list[WeightComponent]
    heads: int  # heads of this matrix (k, v: the KV heads)
    head_axis: int  # 1: head h owns columns c_h (q, k, v); 0: rows c_h (o)

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.attention}.{self.matrix}"

    def lora_a(self) -> torch.Tensor | None:
        """The ``A`` matrix (r × d_in) when the update is exactly one LoRA branch, else None."""
        if len(self.branches) == 1 and type(self.branches[0]) is LoRA:
            return self.branches[0].lora_A.detach()
        return None

    def branch_norms(self) -> dict[str, float]:
        """``‖ΔW‖_F`` of each kind of branch (Kernel-mix: the shared LoRA vs the head-specific part)."""
        out: dict[str, float] = {}
        for b in self.branches:
            name = type(b).__name__
            norm = float(torch.linalg.matrix_norm(b.delta_weight().detach().double()))
            out[name] = (out.get(name, 0.0) ** 2 + norm**2) ** 0.5
        return out


@torch.no_grad()
def weight_updates(adapted: AdaptedModel, attention: str = "all") -> list[MatrixUpdate]:
    """Every attention matrix (q, k, v, o) that carries weight-site branches, in layer order."""
    out = []
    position = {id(layer): i for i, layer in enumerate(adapted.anatomy.layers)}
    for layer, att in adapted.anatomy.attentions(attention):
        for name in ("q", "k", "v", "o"):
            proj = att.projection(name)
            wrapper = getattr(proj.parent, proj.attr)
            if not isinstance(wrapper, AdaptedProjection):
                continue
            branches = [b for b in wrapper.branches
                        if (b.projection.start, b.projection.stop) == (proj.start, proj.stop) and b.mergeable]
            if not branches:
                continue
            delta = sum(b.delta_weight().detach() for b in branches)
            heads = att.num_kv_heads if name in ("k", "v") else att.num_heads
            out.append(MatrixUpdate(position[id(layer)], layer.stack, att.kind, name, proj.weight().detach().clone(),
                                    delta, branches, heads, 0 if name == "o" else 1))
    return out
