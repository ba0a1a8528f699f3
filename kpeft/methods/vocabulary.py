"""New vocabulary rows as a parameters-site component (the NLG task embeddings, [KM] App. B.1).

A task that adds tokens to the tokenizer (the NLG tasks: ``<pad>`` and the special tokens) needs
embedding rows for them. :func:`add_vocabulary_rows` gives them their own small parameter,
:class:`VocabularyRows` (``(total − first, d)``, N(0, ``initializer_range``)), and leaves the
pretrained matrix frozen and untouched:

* the input embedding becomes :class:`ExtendedEmbedding`: ids below ``first`` look up the frozen
  rows, the others the new ones — ``embed([W; R])`` without forming ``[W; R]``;
* the tied LM head becomes :class:`ExtendedHead`: ``logits = [h Wᵀ, h Rᵀ]``, so the new rows are
  output embeddings too, as with GPT-2's tied ``wte``;
* a model whose forward ignores ``token_type_ids`` (Llama) gets a pre-hook adding
  ``embed(token_type_ids)`` to ``embed(input_ids)`` (GPT-2's task embeddings; RoPE: no positions).

The rows train with the method but stay out of the budget (``uncounted``, as in the papers) and are
saved with the adapter; weight decay reaches only them. ``fidelity=code`` (docs/deviations.md,
item 13): the frozen rows also get a gradient, for the clipping norm only — it is never applied.
A backbone whose input embedding already trains (full fine-tuning) is resized instead: there the
whole matrix trains and counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kpeft.errors import KpeftError
from kpeft.methods.adapted import AdaptedModel
from kpeft.methods.parameters import ParameterComponent

KEY = "vocabulary_rows"  # its entry in AdaptedModel.components


class VocabularyRows(ParameterComponent):
    """The trained rows ``first … total−1`` of the vocabulary; unfreezes no backbone tensor."""

    counted = False  # the papers' budgets leave the task embeddings out ([KM] App. B.1)

    def __init__(self, first: int, total: int, dim: int, std: float, device=None, dtype=None):
        super().__init__()
        self.first, self.total = first, total
        self.weight = nn.Parameter(torch.empty(total - first, dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, 0.0, std)

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(())

    def upgrade_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapters of earlier versions hold these rows as ``<embedding>.weight`` (the trained
        rows of the resized matrix): the same numbers, now ``<embedding>.rows.weight``."""
        name = next(n for n, m in model.named_modules() if m is self)
        old = name.rpartition(".")[0] + ".weight"
        if f"{name}.weight" not in state and old in state and state[old].shape == self.weight.shape:
            state = {(f"{name}.weight" if k == old else k): v for k, v in state.items()}
        return state


class ExtendedEmbedding(nn.Module):
    """The frozen embedding's first ``first`` rows, then the component's rows."""

    def __init__(self, base: nn.Embedding, rows: VocabularyRows):
        super().__init__()
        self.base, self.rows = base, rows
        self.num_embeddings, self.embedding_dim = rows.total, base.embedding_dim
        pad, first = base.padding_idx, rows.first  # a padding row gets no gradient, as in nn.Embedding
        self.pad_old = pad if pad is not None and pad < first else None
        self.pad_new = pad - first if pad is not None and pad >= first else None

    @property
    def weight(self) -> torch.Tensor:
        """The whole ``(total, d)`` matrix (formed on each access: for reading, not in forward)."""
        return torch.cat([self.base.weight[: self.rows.first], self.rows.weight])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        first = self.rows.first
        old = F.embedding(ids.clamp(max=first - 1), self.base.weight[:first], self.pad_old)
        added = F.embedding((ids - first).clamp(min=0), self.rows.weight, self.pad_new)
        return torch.where((ids >= first).unsqueeze(-1), added, old)


class ExtendedHead(nn.Module):
    """The tied LM head over the frozen rows and the component's: ``[h Wᵀ (+ b), h Rᵀ]``."""

    def __init__(self, base: nn.Module, rows: VocabularyRows):
        super().__init__()
        self.base = base
        object.__setattr__(self, "rows", rows)  # registered once, under the input embedding

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight[: self.rows.first], self.rows.weight])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first = self.rows.first
        bias = getattr(self.base, "bias", None)
        old = F.linear(hidden, self.base.weight[:first], None if bias is None else bias[:first])
        return torch.cat([old, F.linear(hidden, self.rows.weight)], dim=-1)


def embeds_token_types(model: nn.Module) -> bool:
    """Whether `model`'s own forward adds ``wte(token_type_ids)`` (GPT-2); Llama ignores them."""
    return getattr(model.config, "model_type", "") == "gpt2"


def _add_token_type_embeddings(module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on a base model without token types (Llama): ``inputs_embeds =
    embed(input_ids) + embed(token_type_ids)``, GPT-2's task embeddings ([KM] Table B.4)."""
    types = kwargs.pop("token_type_ids", None)
    if types is None:
        return args, kwargs
    ids = args[0] if args else kwargs.get("input_ids")
    embed = module.get_input_embeddings()
    base = kwargs.get("inputs_embeds")
    kwargs["inputs_embeds"] = (embed(ids) if base is None else base) + embed(types)
    if args:
        return (None, *args[1:]), kwargs
    kwargs["input_ids"] = None
    return args, kwargs


def add_vocabulary_rows(adapted: AdaptedModel, n_original: int, n_tokens: int, token_types: bool = True,
                        fidelity: str = "paper") -> VocabularyRows | None:
    """Give `adapted` rows for the tokens from `n_original` (the tokenizer before the task's
    tokens) to `n_tokens`; rows the backbone already has from there on are replaced too. With
    `token_types`, a model that does not embed ``token_type_ids`` itself is made to (Llama).
    Returns the component (None when the embedding trains whole: it is resized instead)."""
    model = adapted.model
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    old = embed.weight.shape[0]
    first, total = min(old, n_original), max(old, n_tokens)
    std = float(getattr(model.config, "initializer_range", 0.02))
    if token_types and not embeds_token_types(model):
        model.base_model.register_forward_pre_hook(_add_token_type_embeddings, with_kwargs=True)
    adapted.vocabulary = {"rows_from": first, "rows": total, "token_types": token_types}
    if embed.weight.requires_grad:  # full fine-tuning: the whole (resized) matrix trains and counts
        if total > old:
            model.resize_token_embeddings(total, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[first:].normal_(0.0, std)
        return None
    if total <= first:  # nothing new to embed
        return None
    if head is not None and head.weight is not embed.weight:
        raise KpeftError("task tokens need an LM head tied to the input embedding (tie_word_embeddings=true); "
                         f"{type(model).__name__}'s is untied")
    _replay_resize_draws(total, embed.weight)
    rows = VocabularyRows(first, total, embed.embedding_dim, std, embed.weight.device, embed.weight.dtype)
    model.set_input_embeddings(ExtendedEmbedding(embed, rows))
    if head is not None:
        model.set_output_embeddings(ExtendedHead(head, rows))
    model.config.vocab_size = total
    adapted.components[KEY] = [rows]
    if fidelity == "code":  # docs/deviations.md, item 13: the frozen rows' gradient enters clipping
        embed.weight.requires_grad_(True)
        adapted.mark_gradient_only(embed.weight)
    return rows


def _replay_resize_draws(total: int, weight: torch.Tensor) -> None:
    """Draw the random numbers ``resize_token_embeddings(total, mean_resizing=False)`` drew before
    the rows were initialised in earlier kpeft versions (a new ``nn.Embedding``, then the model's
    init of it): the rows and every later draw (dropout) are then those of those versions' runs."""
    if weight.device.type != "meta" and total > weight.shape[0]:
        scratch = torch.empty(total, weight.shape[1], device=weight.device, dtype=weight.dtype)
        scratch.normal_()
        scratch.normal_()


@contextlib.contextmanager
def folded(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with a plain ``(total, d)`` embedding (and tied head) holding the frozen and the new
    rows, as transformers would save it; the extended modules are restored afterwards."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, ExtendedEmbedding):
        yield model
        return
    plain = nn.Embedding(embed.num_embeddings, embed.embedding_dim, device=embed.base.weight.device,
                         dtype=embed.base.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(embed.weight)
    plain.weight.requires_grad_(False)
    model.set_input_embeddings(plain)
    if isinstance(head, ExtendedHead):
        bias = getattr(head.base, "bias", None)
        out = nn.Linear(plain.embedding_dim, plain.num_embeddings, bias=bias is not None,
                        device=plain.weight.device, dtype=plain.weight.dtype)
        out.weight = plain.weight
        if bias is not None:  # the new rows' logits have no bias
            with torch.no_grad():
                out.bias.zero_()[: embed.rows.first].copy_(bias[: embed.rows.first])
        model.set_output_embeddings(out)
    try:
        yield model
    finally:
        model.set_input_embeddings(embed)
        if isinstance(head, ExtendedHead):
            model.set_output_embeddings(head)
