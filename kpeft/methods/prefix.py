"""Prefix-tuning (Li & Liang 2021) at the attention site.

Per adapted attention module ℓ, ``l`` trained key rows ``P_k^ℓ`` and value rows ``P_v^ℓ``
(``(H_kv, l, p)`` per head) are prepended to the keys and values; every query attends to all of
them (never causally masked: the additive mask gets ``l`` zero columns, and T5's relative bias
too — prefix rows carry no position)::

    head_h(x) = softmax( x W_q^(h) [P_k^(h); K^(h)]ᵀ · scaling ) [P_v^(h); V^(h)]

**Re-parameterisation** (training, ``reparam=true``): ``P = MLP(E)``, ``E ∈ R^{l×d}``,
``MLP = Linear(d→mid_dim) → tanh → Linear(mid_dim→2·L·d_kv)`` (d_kv = H_kv·p; GPT-2: d), the
output viewed as ``(l, 2L, H_kv, p)``: rows ``2ℓ`` and ``2ℓ+1`` are layer ℓ's keys and values
(Li & Liang's layout). Each layer computes only its own slice of the last Linear (the same
numbers, no per-forward cache needed); without gradients (evaluation, generation) the whole
table is computed once and reused until a parameter changes. After training only the table
matters: :meth:`PrefixTuning.stored_numel` = ``2·L·l·d_kv`` (GPT-2 Prefix-8: 147,456 = 0.12%;
trained 9,855,488 = 7.92%). ``reparam=false`` trains the table directly.

**Positions.** The official code feeds the prefix as ``past_key_values``, so real tokens' positions
start at ``l`` (GPT-2's learned positions, Llama's RoPE). ``position_offset=true`` (default)
reproduces that with a forward pre-hook adding ``l`` to the position ids the model embeds
(GPT-2 ``wpe``, Llama ``rotary_emb``); ``false`` keeps positions from 0. BERT/T5: no offset.

**KV cache.** The prefix is not written into the cache: it is prepended inside the attention
function at every call, which gives exactly the logits of a cache whose first ``l`` rows are the
prefix (tested against that), with cached, batched (left-padded) generation unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from torch import nn

from kpeft.methods.attention_site import AttentionCall, AttentionComponent, get_site, use_kpeft_attention
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class PrefixConfig(ComponentConfig):
    """Prefix-tuning (Li & Liang 2021): per layer, l trained key/value rows prepended to
    every head's keys/values (never causally masked). ``reparam``: P = MLP(E) during training,
    E (l, d) → Linear(d, mid_dim) → tanh → Linear(mid_dim, 2·L·d_kv); else P is trained directly."""

    kind: str = "prefix"
    length: int = MISSING
    mid_dim: int = 512
    reparam: bool = True
    # Real tokens' positions start at `length` (the official code feeds the prefix as past keys);
    # GPT-2 and Llama only (BERT/T5 prefixes carry no position).
    position_offset: bool = True
    attention: str = "self"  # self | cross | all


@budget_sizes("prefix")
@dataclass
class PrefixSize:
    """Prefix-tuning: the prefix length l (Prefix-8 = 0.12% stored, Prefix-108 = 1.60%)."""

    length: int = MISSING

PREFIX_ATTR = "kpeft_prefix"


class PrefixTuning(AttentionComponent):
    """The prefixes of ``n_layers`` attention modules (one component for the whole model)."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        num_kv_heads: int,
        head_dim: int,
        length: int,
        mid_dim: int = 512,
        reparam: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        kw = {"device": device, "dtype": dtype}
        self.n_layers, self.length, self.reparam = n_layers, length, reparam
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.d_kv = num_kv_heads * head_dim
        if reparam:
            self.embedding = nn.Embedding(length, d_model, **kw)  # E, N(0, 1) as in Li & Liang
            self.up = nn.Linear(d_model, mid_dim, **kw)
            self.down = nn.Linear(mid_dim, 2 * n_layers * self.d_kv, **kw)
        else:
            self.table = nn.Parameter(torch.empty(length, 2 * n_layers * self.d_kv, **kw))
            nn.init.normal_(self.table)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._blocks: tuple[tuple, tuple[torch.Tensor, ...]] | None = None  # one forward's layer blocks

    def stored_numel(self) -> int:
        """Only the computed prefixes are kept after training: 2·L·l·d_kv."""
        return 2 * self.n_layers * self.length * self.d_kv

    # ------------------------------------------------------------ the prefixes
    def _hidden(self) -> torch.Tensor:
        return torch.tanh(self.up(self.embedding.weight))  # (l, mid_dim)

    def prefix_table(self) -> torch.Tensor:
        """All prefixes, ``(l, 2·L·d_kv)`` (what is stored after training)."""
        return self.down(self._hidden()) if self.reparam else self.table

    def layer_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of attention module `index`, each ``(H_kv, l, p)``."""
        if torch.is_grad_enabled():
            kv = self._layer_blocks(index)
        else:
            kv = self._frozen_table()[:, 2 * index * self.d_kv: 2 * (index + 1) * self.d_kv]
        kv = kv.view(self.length, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def _layer_blocks(self, index: int) -> torch.Tensor:
        """Module `index`'s column block of the table, computed once per forward (the modules ask
        in order, starting at 0) and split into per-module views: ``split``'s backward writes the
        table's gradient once, where a slice per module (of the table or of the MLP's output
        weight) would zero-fill a gradient of the whole table or weight per module."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if index == 0 or self._blocks is None or self._blocks[0] != key:
            self._blocks = (key, self.prefix_table().split(2 * self.d_kv, dim=1))
        return self._blocks[1][index]

    def _frozen_table(self) -> torch.Tensor:
        """The table computed once per parameter state (evaluation, generation)."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.prefix_table().detach())
        return self._cache[1]

    # ------------------------------------------------------------ positions
    def _shift_positional_arg(self, module: nn.Module, args: tuple) -> tuple:
        """Pre-hook on GPT-2's ``wpe``: embed position ids + l."""
        return (args[0] + self.length, *args[1:])

    def _shift_position_ids_kwarg(self, module: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook on Llama's ``rotary_emb(x, position_ids)``: rotate by position ids + l."""
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + self.length}
        else:
            args = (args[0], args[1] + self.length, *args[2:])
        return args, kwargs

    def install_position_offset(self, model: nn.Module, family: str) -> bool:
        """Shift real tokens' positions by l (GPT-2, Llama); False where the family has none."""
        base = getattr(model, "base_model", model)
        if family == "gpt2":
            base.wpe.register_forward_pre_hook(self._shift_positional_arg)
            return True
        if family == "llama":
            base.rotary_emb.register_forward_pre_hook(self._shift_position_ids_kwarg, with_kwargs=True)
            return True
        return False

    def extra_repr(self) -> str:
        return f"layers={self.n_layers}, length={self.length}, d_kv={self.d_kv}, reparam={self.reparam}"


class PrefixLayer(nn.Module):
    """Layer ℓ's handle on the shared :class:`PrefixTuning` (no parameters of its own)."""

    needs_scores = False  # extra keys/values only: the site may use the fused attention

    def __init__(self, prefix: PrefixTuning, index: int):
        super().__init__()
        object.__setattr__(self, "prefix", prefix)  # not a submodule: owned by the model root
        self.index = index

    def extend_kv(self, call: AttentionCall) -> None:
        pk, pv = self.prefix.layer_kv(self.index)
        b, length = call.key.shape[0], pk.shape[1]
        call.key = torch.cat([pk.to(call.key.dtype).expand(b, -1, -1, -1), call.key], dim=2)
        call.value = torch.cat([pv.to(call.value.dtype).expand(b, -1, -1, -1), call.value], dim=2)
        if call.mask is not None:  # zero columns: every query sees the whole prefix
            call.mask = F.pad(call.mask, (length, 0))
        if call.position_bias is not None:
            call.position_bias = F.pad(call.position_bias, (length, 0))
        call.n_prefix += length

    def transform_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        return out

    def extra_repr(self) -> str:
        return f"index={self.index}"


def _unique_attr(model: nn.Module, base: str) -> str:
    name, i = base, 1
    while name in model._modules:
        name, i = f"{base}_{i}", i + 1
    return name


@register("prefix", PrefixConfig)
def build_prefix(cfg: DictConfig, ctx: BuildContext) -> list[PrefixTuning]:
    """One :class:`PrefixTuning` (``model.kpeft_prefix``) over every ``cfg.attention`` module."""
    atts = [att for _, att in ctx.anatomy.attentions(cfg.attention)]
    if not atts:
        raise ValueError(f"no {cfg.attention} attention modules for prefix-tuning")
    shapes = {(att.num_kv_heads, att.head_dim) for att in atts}
    if len(shapes) != 1:
        raise ValueError(f"prefix-tuning needs one (kv heads, head size) for all layers, got {sorted(shapes)}")
    (kv_heads, head_dim), = shapes
    model = ctx.model
    use_kpeft_attention(model)
    ref = next(model.parameters())
    prefix = PrefixTuning(
        len(atts), ctx.anatomy.hidden_size, kv_heads, head_dim, cfg.length, cfg.mid_dim, cfg.reparam,
        device=ref.device, dtype=ref.dtype,
    )
    model.add_module(_unique_attr(model, PREFIX_ATTR), prefix)
    for i, att in enumerate(atts):
        get_site(att).components.append(PrefixLayer(prefix, i))
    if cfg.position_offset:
        prefix.install_position_offset(model, ctx.anatomy.family)
    return [prefix]
