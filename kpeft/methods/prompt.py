"""Prompt tuning (Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning") at the input site: ``n`` trained vectors ``P ∈ R^{n×d}`` in the space of the input
(word) embeddings, prepended to the embedded input; nothing else changes. Count ``n·d``.

**The hook.** A forward pre-hook on the backbone's base model (GPT-2 ``transformer``,
BERT/RoBERTa ``bert``/``roberta``, Llama ``model``, T5 ``encoder``) rewrites its keyword
arguments, so that the family's own code then adds positions, token types, masks and caches:

* prefill (no cache yet): ``input_ids`` → ``inputs_embeds = [E(x)_{<k}; P; E(x)_{≥k}]``; the
  attention mask gets n ones at the same place; explicit ``position_ids`` become
  ``[pos_{<k}; pos_{k−1}+1 … +n; pos_{≥k} + n]`` (callers count real tokens from 0, as
  :mod:`kpeft.training.decode` does). Without explicit positions the model numbers the
  prompted sequence itself: GPT-2's learned positions and Llama's RoPE give the prompt 0…n−1 and
  the tokens n…; RoBERTa's padding-aware positions are computed from ``input_ids`` first and
  shifted the same way; T5's relative bias needs nothing;
* cached steps: the prompt is already in the KV cache (prepended once, at prefill), so only the
  attention mask (a caller's mask covers the real tokens: n ones are prepended when it is n short)
  and explicit position ids (+ n) are adjusted.

A forward hook on the same module removes the n prompt rows from its outputs (``last_hidden_state``
and ``hidden_states``), so the heads, losses and decoders see exactly the real tokens: causal-LM
logits stay aligned with their labels (no loss on prompt positions), GPT-2/Llama classifiers find
the last real token from ``input_ids`` as usual. The T5 encoder keeps its prompt rows — the
decoder cross-attends to them, as in Lester et al. — and a pre-hook on the decoder prepends n ones
to the encoder mask it receives.

**Where.** ``k = 0`` (in front) except for BERT/RoBERTa, where ``k = 1``: the prompt goes after
[CLS]/<s>, which must stay at position 0 for the pooler/classifier (``after_first_token``). Token
types: GPT-2 adds ``wte(token_type_ids)`` to the real tokens' rows at prefill (the prompt rows get
none; Llama's NLG task embeddings likewise); BERT gives the prompt the first token's type.

**Init** (Lester et al. §3.2): ``vocab`` — rows of the frozen embedding matrix of ``n`` token ids
drawn without replacement from the ``vocab_top_k`` (5,000) lowest ids (SentencePiece, T5's
tokenizer, numbers tokens by frequency; GPT-2's BPE ids roughly follow merge frequency); ``text``
— the embeddings of ``init_text``'s tokens, repeated to fill n (truncated if longer); ``uniform``
— U[−0.5, 0.5] (``uniform_range``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import MISSING, DictConfig
from torch import nn

from kpeft.backbones.cache_api import cache_arg
from kpeft.methods.base import Component
from kpeft.methods.registry import BuildContext, ComponentConfig, budget_sizes, register


@dataclass
class PromptTuningConfig(ComponentConfig):
    """Prompt tuning (Lester et al. 2021): `length` trained vectors prepended to the input embeddings."""

    kind: str = "prompt_tuning"
    length: int = MISSING
    init: str = "vocab"  # vocab: rows of sampled common tokens | text: init_text's tokens | uniform
    vocab_top_k: int = 5000  # vocab: sample from the ids below this (Lester et al.: 5,000 most common)
    init_text: str | None = None  # text: tokenised, repeated to the length
    tokenizer: str | None = None  # text: tokenizer dir/hub id (default: the model's name_or_path)
    uniform_range: float = 0.5  # uniform: U[-x, x] (Lester et al.: 0.5)
    # null: after the first token for BERT/RoBERTa ([CLS] stays at position 0), in front elsewhere
    after_first_token: bool | None = None


@budget_sizes("prompt_tuning")
@dataclass
class PromptSize:
    """Prompt tuning (Lester et al.): the number of soft-prompt vectors n (n·d parameters)."""

    length: int = MISSING

PROMPT_ATTR = "kpeft_prompt"
INITS = ("vocab", "text", "uniform")
_SIGNATURES: dict[type, inspect.Signature] = {}


def _call_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`module`'s call arguments as keywords (positional ones bound to their names)."""
    if not args:
        return dict(kwargs)
    sig = _SIGNATURES.setdefault(type(module), inspect.signature(type(module).forward))
    names = [n for n, p in sig.parameters.items() if n != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    if len(args) > len(names):
        raise RuntimeError(f"prompt tuning: {type(module).__name__} got {len(args)} positional arguments")
    return {**dict(zip(names, args)), **kwargs}


def _insert(t: torch.Tensor, k: int, block: torch.Tensor) -> torch.Tensor:
    """``[t_{<k}; block; t_{≥k}]`` along dim 1."""
    return torch.cat([t[:, :k], block, t[:, k:]], dim=1)


def _drop(t: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """`t` without rows ``k … k+n−1`` of dim 1."""
    return torch.cat([t[:, :k], t[:, k + n:]], dim=1)


def _past_length(past: Any) -> int:
    if past is None:
        return 0
    get = getattr(past, "get_seq_length", None)
    return int(get()) if get is not None else int(past[0][0].shape[-2])


class PromptTuning(Component):
    """The soft prompt ``(n, d)`` and the hooks that prepend it (one component per model)."""

    site: ClassVar[str] = "input"
    mergeable: ClassVar[bool] = False

    def __init__(self, length: int, d_model: int, family: str, *, after_first_token: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if length < 1:
            raise ValueError(f"prompt length must be >= 1, not {length}")
        self.length, self.family = length, family
        self.insert_at = 1 if after_first_token else 0
        self.prompt = nn.Parameter(torch.empty(length, d_model, device=device, dtype=dtype))
        self.init_ids: list[int] | None = None  # the vocabulary rows it was initialised from
        self.hooks: list[Any] = []
        self._inserted = False

    # ------------------------------------------------------------ init
    @torch.no_grad()
    def init_uniform(self, bound: float = 0.5) -> None:
        self.prompt.uniform_(-bound, bound)
        self.init_ids = None

    @torch.no_grad()
    def init_from_vocab(self, embedding: torch.Tensor, ids: list[int]) -> None:
        """Copy the rows `ids` of the (frozen) embedding matrix."""
        self.prompt.copy_(embedding[torch.tensor(ids, device=embedding.device)])
        self.init_ids = list(ids)

    # ------------------------------------------------------------ the hooks
    def _embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Pre-hook on the base model / T5 encoder: prepend the prompt at prefill, extend the mask
        and shift explicit positions (every call)."""
        kw = _call_kwargs(module, args, kwargs)
        n, k = self.length, self.insert_at
        past = _past_length(kw.get(cache_arg(module)))  # `cache` (transformers ≥ 5.24) or `past_key_values`
        mask, pos = kw.get("attention_mask"), kw.get("position_ids")
        self._inserted = past == 0
        if not self._inserted:  # a cached step: the prompt is in the cache already
            width = kw["input_ids" if kw.get("input_ids") is not None else "inputs_embeds"].shape[1]
            if mask is not None and mask.dim() == 2 and mask.shape[1] == past + width - n:
                kw["attention_mask"] = _insert(mask, k, mask.new_ones(mask.shape[0], n))
            if pos is not None:
                kw["position_ids"] = pos + n
            return (), kw
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if embeds is None:
            embeds = self._embed()(ids)
        b = embeds.shape[0]
        types = kw.get("token_type_ids")
        if types is not None and self.family == "bert":
            kw["token_type_ids"] = _insert(types, k, types[:, k - 1:k].expand(b, n) if k else types.new_zeros(b, n))
        elif types is not None:  # GPT-2 / Llama task embeddings: on the real tokens' rows only
            embeds = embeds + self._embed()(kw.pop("token_type_ids"))
        if pos is None and ids is not None and self.family == "bert":
            pos = self._roberta_positions(module, ids)
        kw["inputs_embeds"] = _insert(embeds, k, self.prompt.to(embeds.dtype).expand(b, n, -1))
        kw["input_ids"] = None
        if mask is not None and mask.dim() == 2:
            kw["attention_mask"] = _insert(mask, k, mask.new_ones(b, n))
        if pos is not None:  # the prompt continues the positions before it; the tokens after move by n
            start = pos[:, k - 1:k] + 1 if k else pos.new_zeros(pos.shape[0], 1)
            kw["position_ids"] = torch.cat([pos[:, :k], start + torch.arange(n, device=pos.device), pos[:, k:] + n], 1)
        return (), kw

    @staticmethod
    def _roberta_positions(module: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
        """RoBERTa's padding-aware positions of the real tokens (None: BERT's 0, 1, … suffice)."""
        emb = getattr(module, "embeddings", None)
        make = getattr(emb, "create_position_ids_from_input_ids", None)
        return None if make is None else make(ids, emb.padding_idx)

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: drop the prompt rows from the outputs (prefill calls only)."""
        if not self._inserted:
            return output
        self._inserted = False
        n, k = self.length, self.insert_at
        if isinstance(output, tuple):
            return (_drop(output[0], k, n), *output[1:])
        output["last_hidden_state"] = _drop(output["last_hidden_state"], k, n)
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(_drop(h, k, n) for h in output["hidden_states"])
        return output

    def extend_encoder_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Pre-hook on T5's decoder: the encoder output carries the prompt rows; its mask gets n ones."""
        kw = _call_kwargs(module, args, kwargs)
        mask, states = kw.get("encoder_attention_mask"), kw.get("encoder_hidden_states")
        if mask is not None and states is not None and mask.dim() == 2 and mask.shape[1] == states.shape[1] - self.length:
            kw["encoder_attention_mask"] = _insert(mask, self.insert_at, mask.new_ones(mask.shape[0], self.length))
        return (), kw

    def install(self, model: nn.Module) -> None:
        """Register as ``model.kpeft_prompt`` and hook the module that embeds the input."""
        object.__setattr__(self, "model", model)  # not a submodule: the prompt is the model's child
        model.add_module(PROMPT_ATTR, self)
        if self.family == "t5":
            self.hooks = [
                model.get_encoder().register_forward_pre_hook(self.before, with_kwargs=True),
                model.get_decoder().register_forward_pre_hook(self.extend_encoder_mask, with_kwargs=True),
            ]
            return
        base = model.base_model
        self.hooks = [base.register_forward_pre_hook(self.before, with_kwargs=True), base.register_forward_hook(self.after)]

    def remove(self) -> None:
        """Take the hooks and the parameter away again (the plain backbone)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.model._modules.get(PROMPT_ATTR) is self:
            del self.model._modules[PROMPT_ATTR]

    def extra_repr(self) -> str:
        return f"length={self.length}, d={self.prompt.shape[1]}, insert_at={self.insert_at}"


def vocab_init_ids(length: int, vocab_size: int, top_k: int = 5000) -> list[int]:
    """`length` distinct token ids drawn from the ``min(top_k, V)`` lowest (with repeats only if
    the prompt is longer than that range)."""
    pool = min(top_k, vocab_size)
    reps = -(-length // pool)
    return torch.cat([torch.randperm(pool) for _ in range(reps)])[:length].tolist()


def text_init_ids(text: str, tokenizer: Any, length: int) -> list[int]:
    """`text`'s token ids (no special tokens), repeated to fill `length` and truncated to it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt init_text {text!r} has no tokens")
    return (ids * -(-length // len(ids)))[:length]


def _tokenizer(cfg: DictConfig, model: nn.Module):
    from kpeft.backbones.loading import load_tokenizer  # (heavy import, only for init=text)

    src = cfg.tokenizer or getattr(model.config, "name_or_path", "") or None
    if not src:
        raise ValueError("prompt init=text needs a tokenizer: set method.components.prompt.tokenizer=DIR")
    return load_tokenizer(DictConfig({"name": "prompt init", "tokenizer": src, "init": "pretrained",
                                      "package": None, "name_or_path": src, "gguf_file": None}))


@register("prompt_tuning", PromptTuningConfig)
def build_prompt_tuning(cfg: DictConfig, ctx: BuildContext) -> list[PromptTuning]:
    """One :class:`PromptTuning` (``model.kpeft_prompt``) in front of the model's input."""
    model, family = ctx.model, ctx.anatomy.family
    if str(cfg.init) not in INITS:
        raise ValueError(f"prompt init must be one of {', '.join(INITS)}, not {cfg.init!r}")
    if PROMPT_ATTR in model._modules:
        raise ValueError("the model already has a soft prompt")
    table = model.get_input_embeddings().weight
    after_first = family == "bert" if cfg.after_first_token is None else bool(cfg.after_first_token)
    prompt = PromptTuning(int(cfg.length), table.shape[1], family, after_first_token=after_first,
                          device=table.device, dtype=table.dtype)
    if table.is_meta:  # counting: no values to copy
        pass
    elif cfg.init == "uniform":
        prompt.init_uniform(float(cfg.uniform_range))
    elif cfg.init == "vocab":
        prompt.init_from_vocab(table, vocab_init_ids(prompt.length, table.shape[0], int(cfg.vocab_top_k)))
    else:
        if not cfg.init_text:
            raise ValueError("prompt init=text needs method.components.prompt.init_text='...'")
        prompt.init_from_vocab(table, text_init_ids(str(cfg.init_text), _tokenizer(cfg, model), prompt.length))
    prompt.install(model)
    return [prompt]


__all__ = ["PromptTuning", "text_init_ids", "vocab_init_ids"]
