"""BERT / RoBERTa / MiniLM: ``attention.self.{query,key,value}``, ``attention.output.dense`` = W_o."""

from __future__ import annotations

from torch import nn

from kpeft.backbones.anatomy import Anatomy, Attention, Layer, linear_projection


def describe(model: nn.Module) -> Anatomy:
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size
    layers = []
    for i, block in enumerate(model.base_model.encoder.layer):
        sa, out = block.attention.self, block.attention.output
        att = Attention(
            sa, "self",
            linear_projection(sa, "query"), linear_projection(sa, "key"),
            linear_projection(sa, "value"), linear_projection(out, "dense"),
            heads, heads, d // heads,
        )
        layers.append(Layer(i, "encoder", [att], block.intermediate, block.output.dense, block))
    return Anatomy("bert", d, layers)
