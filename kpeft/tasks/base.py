"""What a task provides to the training loop: encoded splits, batching, loss and metrics.

A task is built from ``cfg.task`` (and the tokenizer, when it needs one). Its ``kind`` decides the
model head (``classification`` → a sequence classifier, ``causal_lm`` → an LM head,
``seq2seq`` → an encoder-decoder) and the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from kpeft.errors import KpeftError
from kpeft.tasks import lengths
from kpeft.training.beam import DecodeSettings

Example = dict[str, Any]
IGNORE = -100


@dataclass(frozen=True)
class NewTokens:
    """Tokens a task added to the tokenizer: ids ``first`` … ``total − 1`` need embedding rows
    (installed by :func:`kpeft.methods.vocabulary.add_vocabulary_rows`)."""

    first: int  # the tokenizer's size before the task's tokens
    total: int  # its size with them
    token_types: bool = False  # the task passes token_type_ids (special-token ids) to be embedded too


class Task:
    """Base class: subclasses implement :meth:`load_splits` (and may override metrics).

    What the training loop and the model builder ask of every task is declared here, with
    defaults: :meth:`new_tokens` (None) and, for tasks with ``generates = True``,
    :meth:`generate` and :meth:`evaluate_generation`."""

    needs_tokenizer: bool = True
    #: True: the task is evaluated on its generations (:meth:`evaluate_generation`), not on batches.
    generates: ClassVar[bool] = False
    #: Set by the loop while validating by a metric: generate for the first so many items only.
    generation_limit: int | None = None
    #: The model's input positions (set by ``kpeft.train.build`` before :meth:`load_splits`);
    #: None: no limit besides ``task.max_length`` (see :mod:`kpeft.tasks.lengths`).
    max_positions: int | None = None
    #: How generation-evaluated tasks decode: the root config's ``decode`` section (set by ``build``).
    decoding: DecodeSettings = DecodeSettings()

    def __init__(self, cfg: DictConfig, tokenizer=None, pad_token_id: int = 0):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id if tokenizer is None else tokenizer.pad_token_id

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def head(self) -> str:
        return {"classification": "classification", "causal_lm": "causal_lm", "seq2seq": "seq2seq"}[self.kind]

    def data_dir(self, required: Sequence[str] = (), how_to_get: str = "") -> Path:
        """``task.data_dir`` checked to exist and to hold the `required` files, or a one-line
        error saying how to get them (the hub, or the official files under task.data_dir)."""
        hint = how_to_get or "download the official files"
        if not self.cfg.data_dir:
            raise KpeftError(
                f"task '{self.name}' needs data: {hint} and pass task.data_dir=DIR, or load it from the hub"
            )
        root = Path(self.cfg.data_dir).expanduser()
        missing = [f for f in required if not (root / f).exists()]
        if not root.is_dir() or missing:
            what = f"'{root}' does not exist" if not root.is_dir() else f"'{root}' lacks {', '.join(missing)}"
            raise KpeftError(f"task '{self.name}': task.data_dir {what}; {hint}")
        return root

    def load_splits(self) -> dict[str, list[Example]]:  # pragma: no cover - abstract
        """``{"train": [...], "validation": [...], "test": [...]}`` of encoded examples."""
        raise NotImplementedError

    # ------------------------------------------------------------ what the builder and the loop ask
    def new_tokens(self) -> NewTokens | None:
        """Tokens this task added to the tokenizer, which the model needs rows for (NLG tasks)."""
        return None

    def generate(self, model, items: Sequence[Any], batch_size: int = 16) -> list[str]:  # pragma: no cover
        """Decoded outputs for the task's `items` (``generates`` tasks)."""
        raise NotImplementedError(f"task '{self.name}' does not generate")

    def evaluate_generation(self, model, split: str, run_dir: str | Path | None = None, batch_size: int = 16,
                            accelerator=None) -> dict[str, Any]:  # pragma: no cover
        """The split's metrics from its generations (``generates`` tasks; the loop adds the loss)."""
        raise NotImplementedError(f"task '{self.name}' is evaluated on batches, not generations")

    # ------------------------------------------------------------ lengths
    @property
    def truncation(self) -> str:
        return lengths.check_policy(self.cfg.get("truncation", "truncate"))

    def input_limit(self) -> int:
        """The longest input: ``task.max_length`` within the model's positions (or an error)."""
        return lengths.input_limit(int(self.cfg.max_length), self.max_positions, self.truncation)

    def tokenize_fitted(self, a: Sequence[str], b: Sequence[str] | None, split: str,
                        counts: dict[str, tuple[int, int]]) -> list[list[int]]:
        """Token ids of texts (or text pairs) cut to :meth:`input_limit` as the tokenizer cuts them
        (pairs: longest first); ``counts[split]`` = (examples cut, examples). With
        ``task.truncation=error`` an example that does not fit is an error."""
        limit = self.input_limit()
        ids = self.tokenizer(list(a), list(b) if b is not None else None, verbose=False)["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > limit]
        counts[split] = (len(long), len(ids))
        if long and self.truncation == "error":
            raise lengths.refuse_long(len(long), len(ids), split, limit)
        if long:
            cut = self.tokenizer([a[i] for i in long], [b[i] for i in long] if b is not None else None,
                                 truncation=True, max_length=limit)["input_ids"]
            for i, row in zip(long, cut):
                ids[i] = row
        return ids

    # ------------------------------------------------------------ batching
    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example of the batch."""
        batch: dict[str, torch.Tensor] = {}
        width = max(len(e["input_ids"]) for e in examples)
        batch["input_ids"] = _pad([e["input_ids"] for e in examples], width, self.pad_token_id)
        batch["attention_mask"] = _pad([[1] * len(e["input_ids"]) for e in examples], width, 0)
        if self.kind == "classification":
            dtype = torch.float if self.cfg.num_labels == 1 else torch.long
            batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=dtype)
        else:
            lw = max(len(e["labels"]) for e in examples)
            batch["labels"] = _pad([e["labels"] for e in examples], lw, IGNORE)
        return batch

    # ------------------------------------------------------------ loss
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many scored units (examples, or target tokens) the batch's loss sums over."""
        labels = batch["labels"]
        if self.kind == "classification":
            return labels.shape[0]
        if self.kind == "causal_lm":
            labels = labels[:, 1:]
        return int((labels != IGNORE).sum())

    def loss(self, model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's scored units and their number (examples or target tokens).

        Returning the *sum* lets the loop divide by the global count of an optimizer step, so that
        gradient accumulation and data-parallel runs equal one big batch (Lin et al. 2020's loss: averaged
        over the non-ignored target tokens of the batch).
        """
        logits, labels = self.scored_logits_and_labels(model, batch)
        if self.kind == "classification" and self.cfg.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels, reduction="sum"), labels.numel()
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()
        flat_labels = labels.reshape(-1)
        loss = F.cross_entropy(
            flat_logits, flat_labels, ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing
        )
        return loss, int((flat_labels != IGNORE).sum())

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's keyword inputs of a batch (labels excluded)."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def logits_and_labels(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits aligned with their labels (causal LMs: shifted so logit t predicts token t+1)."""
        inputs = self.model_inputs(batch)
        if self.kind == "seq2seq":
            labels = batch["labels"]
            out = model(**inputs, decoder_input_ids=shift_right(labels, _config(model)))
            return out.logits, labels
        out = model(**inputs)
        if self.kind == "causal_lm":
            return out.logits[:, :-1], batch["labels"][:, 1:]
        return out.logits, batch["labels"]

    def scored_logits_and_labels(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the loss and the metrics read: :meth:`logits_and_labels`, except that a causal LM
        gets ``(N, V)`` logits of its N scored positions only (``(N,)`` labels): the LM head never
        runs on prompt tokens (same loss, a fraction of the head's cost and memory)."""
        if self.kind != "causal_lm":
            return self.logits_and_labels(model, batch)
        return target_logits(model, self.model_inputs(batch), batch["labels"])

    # ------------------------------------------------------------ metrics
    @torch.no_grad()
    def example_scores(self, model, batch: dict[str, torch.Tensor]) -> list[dict[str, float]] | None:
        """Per-example prediction, label and score (1/0 correct; regression: −squared error) of a
        classification batch, for paired significance tests; None for other kinds."""
        if self.kind != "classification":
            return None
        logits, labels = self.logits_and_labels(model, batch)
        if self.cfg.num_labels == 1:
            pred = logits.squeeze(-1).float()
            return [{"prediction": p, "label": y, "score": -((p - y) ** 2)}
                    for p, y in zip(pred.tolist(), labels.float().tolist())]
        pred = logits.argmax(-1)
        return [{"prediction": p, "label": y, "score": float(p == y)} for p, y in zip(pred.tolist(), labels.tolist())]

    @torch.no_grad()
    def batch_metrics(self, model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Summable statistics of one batch; :meth:`finalize` turns their totals into metrics."""
        logits, labels = self.scored_logits_and_labels(model, batch)
        if self.kind == "classification" and self.cfg.num_labels == 1:
            err = (logits.squeeze(-1).float() - labels) ** 2
            return {"sq_err": float(err.sum()), "n": labels.numel()}
        pred = logits.argmax(-1)
        mask = labels != IGNORE
        return {"correct": float(((pred == labels) & mask).sum()), "n": float(mask.sum())}

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        if "sq_err" in totals:
            return {"mse": totals["sq_err"] / max(totals["n"], 1)}
        return {"accuracy": 100.0 * totals["correct"] / max(totals["n"], 1)}


def _config(model):
    return getattr(model, "module", model).config  # through a DDP wrapper


def target_logits(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits at the positions whose next token is scored, ``(N, V)``, and those N
    labels: a forward pre-hook on the output embedding hands it only the hidden states of these
    positions (through a DDP wrapper too, which must see the forward call)."""
    scored = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    keep = F.pad(scored, (0, 1))  # the last position predicts nothing
    head = getattr(model, "module", model).get_output_embeddings()
    if head is None or keep.shape != inputs["input_ids"].shape:
        logits = model(**inputs).logits[:, :-1]
        return logits[scored], labels[:, 1:][scored]

    def gather(module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"target_logits: the LM head got {tuple(hidden.shape)}, not (batch, length, d)")
        return (hidden[keep], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits, labels[:, 1:][scored]


def shift_right(labels: torch.Tensor, config) -> torch.Tensor:
    """Decoder inputs for an encoder-decoder: ``[start] + labels[:-1]``, ignored positions → pad."""
    start = config.decoder_start_token_id
    start = config.pad_token_id if start is None else start
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, config.pad_token_id)


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
