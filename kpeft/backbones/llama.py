"""Llama family (SmolLM2) and its look-alikes, Mistral and Qwen2 (q/k/v biases): ``self_attn.
{q,k,v,o}_proj`` with grouped-query attention and RoPE, SwiGLU FFN ``mlp.{gate,up,down}_proj``.
Phi-3 fuses q, k, v into one ``self_attn.qkv_proj`` (and gate/up into ``mlp.gate_up_proj``): its
q/k/v are row blocks of that Linear, ``q | k | v`` of widths ``H·p | H_kv·p | H_kv·p``, as GPT-2's
fused ``c_attn`` is sliced into column blocks."""

from __future__ import annotations

from torch import nn

from kpeft.backbones.anatomy import Anatomy, Attention, Layer, Projection, linear_projection


def _qkvo(sa: nn.Module, heads: int, kv_heads: int, head_dim: int) -> list[Projection]:
    """q, k, v, o of one attention module (fused Phi-3 ``qkv_proj`` sliced into blocks)."""
    fused = getattr(sa, "qkv_proj", None)
    if fused is None:
        return [linear_projection(sa, f"{name}_proj") for name in ("q", "k", "v", "o")]
    q, kv = heads * head_dim, kv_heads * head_dim
    blocks = ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
    return [Projection(sa, "qkv_proj", "linear", fused.in_features, stop - start, (start, stop))
            for start, stop in blocks] + [linear_projection(sa, "o_proj")]


def describe(model: nn.Module) -> Anatomy:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for i, block in enumerate(model.base_model.layers):
        sa = block.self_attn
        att = Attention(
            sa, "self", *_qkvo(sa, heads, kv_heads, head_dim),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, causal=True, rotary=True,
        )
        layers.append(Layer(i, "decoder", [att], block.mlp, block.mlp.down_proj, block))
    return Anatomy("llama", cfg.hidden_size, layers)
