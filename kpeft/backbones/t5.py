"""T5: encoder self-attention, decoder self- and cross-attention (``q,k,v,o`` Linear, no bias, no
1/sqrt(d) score scaling), FFN ``DenseReluDense`` (gated in v1.1)."""

from __future__ import annotations

from torch import nn

from kpeft.backbones.anatomy import Anatomy, Attention, Layer, linear_projection


def _attention(module: nn.Module, kind: str, cfg, causal: bool) -> Attention:
    return Attention(
        module, kind,
        *(linear_projection(module, name) for name in ("q", "k", "v", "o")),
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads, head_dim=cfg.d_kv,
        scaled=False, causal=causal,
    )


def describe(model: nn.Module) -> Anatomy:
    cfg = model.config
    layers = []
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        if stack is None:  # T5EncoderModel
            continue
        for i, block in enumerate(stack.block):
            atts = [_attention(block.layer[0].SelfAttention, "self", cfg, causal=stack_name == "decoder")]
            if stack_name == "decoder":
                atts.append(_attention(block.layer[1].EncDecAttention, "cross", cfg, causal=False))
            ffn = block.layer[-1].DenseReluDense
            layers.append(Layer(i, stack_name, atts, ffn, ffn.wo, block))
    return Anatomy("t5", cfg.d_model, layers)
