"""Llama family (SmolLM2): ``self_attn.{q,k,v,o}_proj`` with grouped-query attention and RoPE,
SwiGLU FFN ``mlp.{gate,up,down}_proj``."""

from __future__ import annotations

from torch import nn

from kpeft.backbones.anatomy import Anatomy, Attention, Layer, linear_projection


def describe(model: nn.Module) -> Anatomy:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for i, block in enumerate(model.base_model.layers):
        sa = block.self_attn
        att = Attention(
            sa, "self",
            *(linear_projection(sa, f"{name}_proj") for name in ("q", "k", "v", "o")),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, causal=True, rotary=True,
        )
        layers.append(Layer(i, "decoder", [att], block.mlp, block.mlp.down_proj, block))
    return Anatomy("llama", cfg.hidden_size, layers)
