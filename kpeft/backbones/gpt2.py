"""GPT-2: fused ``attn.c_attn`` Conv1D (768→2304: q | k | v column blocks), ``attn.c_proj`` = W_o."""

from __future__ import annotations

from torch import nn

from kpeft.backbones.anatomy import Anatomy, Attention, Layer, Projection


def describe(model: nn.Module) -> Anatomy:
    cfg = model.config
    d, heads = cfg.n_embd, cfg.n_head
    layers = []
    for i, block in enumerate(model.base_model.h):
        attn = block.attn
        q, k, v = (Projection(attn, "c_attn", "conv1d", d, d, (j * d, (j + 1) * d)) for j in range(3))
        o = Projection(attn, "c_proj", "conv1d", d, d)
        att = Attention(attn, "self", q, k, v, o, heads, heads, d // heads, scaled=cfg.scale_attn_weights, causal=True)
        layers.append(Layer(i, "decoder", [att], block.mlp, block.mlp.c_proj, block))
    return Anatomy("gpt2", d, layers)
