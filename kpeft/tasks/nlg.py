"""The GPT-2 (VGLM / Kernel-mix code) encoding of the NLG benchmarks ([KM] App. B.1–B.2).

Shared by :class:`~kpeft.tasks.webnlg.WebNLG`, :class:`~kpeft.tasks.coqa.CoQA` and
:class:`~kpeft.tasks.cnndm.CNNDM` through :class:`NLGTask`:

* **vocabulary** — ``<pad>`` and the task's special tokens are added to the tokenizer
  (``task.options.all_special_tokens=true``: all 15 of the official code, in its order:
  ``<pad>``, CoQA, CNN/DM, WebNLG → vocabulary 50,273);
* **encoding** — segments ``(type, ids)``; ``input_ids`` = their concatenation, ``token_type_ids``
  = each segment's type (a special-token id) over its tokens (GPT-2 adds ``wte(token_type_ids)``
  to the input, i.e. the task embeddings), ``labels`` = −100 except the final segment after its
  first token (target + eos). Each string is tokenised separately with ``tokenizer.tokenize``
  (never the tokenizer's own bos/eos): without a leading space for byte-level BPEs (GPT-2,
  SmolLM2), with SentencePiece's usual "▁" word prefix for SentencePiece tokenizers;
* **task embeddings** (:meth:`NLGTask.new_tokens`): the tokens from the tokenizer's original size
  on get their own rows, N(0, ``initializer_range``), trained with the method, outside the budget,
  saved with the adapter; the pretrained embedding (tied to the LM head) stays frozen
  (:mod:`kpeft.methods.vocabulary`, installed by the model builder). ``token_type_ids`` are
  embedded too: GPT-2 adds ``wte(token_type_ids)`` itself; for Llama, whose forward ignores
  them, a pre-hook feeds ``inputs_embeds = embed(input_ids) + embed(token_type_ids)`` (GPT-2's
  sum without position embeddings: RoPE), in training and decoding alike;
* **generation** (:meth:`NLGTask.evaluate_generation`, called by ``Trainer.evaluate``): batched
  greedy decoding with a KV cache (:mod:`kpeft.training.decode`; beam search with ``decode.num_beams``
  > 1, ``docs/decoding.md``), stopping on any of the task's special tokens or after
  ``decode.max_new_tokens`` (default: ``task.options.max_new_tokens``, 40), ``task.options.generation_batch_size``
  prompts at a time (default ``train.eval_batch_size``), each process decoding every world-th
  item; the task's official scorer on the main process; the predictions and per-example scores
  in ``<run_dir>/generations/<split>.jsonl``. ``task.options.max_eval_examples`` caps both the
  generations and the loss examples of validation/test; ``max_loss_examples`` the latter only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kpeft.errors import KpeftError
from kpeft.tasks.base import IGNORE, Example, NewTokens, _pad
from kpeft.tasks.benchmark import BenchmarkTask, Record, canonical_split
from kpeft.tasks.lengths import cut_longest_first, refuse_long, warn_truncated

log = logging.getLogger(__name__)

PAD = "<pad>"
SPECIAL_TOKENS = {
    "coqa": ("<bos_qa>", "<eos_qa>", "<question>", "<answer>", "<document>"),
    "cnndm": ("<bos_sm>", "<eos_sm>", "<source_sm>", "<target_sm>"),
    "webnlg": ("<bos_webnlg>", "<eos_webnlg>", "<subject>", "<property>", "<object>", "<target_webnlg>"),
    "e2e": ("<bos_e2e>", "<eos_e2e>", "<attribute>", "<value>", "<target_e2e>"),  # not in [CODE]: kpeft's own
}
ALL_SPECIAL_TOKENS = tuple(t for name in ("coqa", "cnndm", "webnlg") for t in SPECIAL_TOKENS[name])

Segment = tuple[int, list[int]]


def build_example(segments: Sequence[Segment]) -> Example:
    """``input_ids``, ``token_type_ids`` and ``labels`` of `segments` (the last one is the target:
    its first token, a special token, is not scored)."""
    ids, types, labels = [], [], []
    for k, (seg_type, seg) in enumerate(segments):
        ids += seg
        types += [seg_type] * len(seg)
        labels += ([IGNORE] + seg[1:]) if k == len(segments) - 1 else [IGNORE] * len(seg)
    return {"input_ids": ids, "token_type_ids": types, "labels": labels}


def fit_segments(segments: Sequence[Segment], budget: int) -> tuple[list[Segment], bool]:
    """`segments` within `budget` tokens and whether anything was cut: the source segments (all but
    the last) lose tokens from their ends, longest first, each keeping its first (marker) token;
    the target (the last segment) is kept whole, or cut at its end when the sources cannot make
    room (see :mod:`kpeft.tasks.lengths`)."""
    if sum(len(seg) for _, seg in segments) <= budget:
        return list(segments), False
    *source, (target_type, target) = segments
    sizes = cut_longest_first([len(seg) for _, seg in source], max(budget - len(target), 0))
    source = [(t, seg[:n]) for (t, seg), n in zip(source, sizes)]
    room = budget - sum(sizes)
    if room < 1:
        raise KpeftError(f"an example has {len(segments)} segments, more than the {budget} tokens it may have; "
                         "raise task.max_length (within the model's positions) or use a model with more")
    return source + [(target_type, target[:room])], True


class NLGTask(BenchmarkTask):
    """A benchmark with the GPT-2 special-token encoding; subclasses give :meth:`segments`."""

    #: ``SPECIAL_TOKENS`` key; its first two entries are bos and eos, the last the target marker.
    special_key: str = ""
    generates = True

    def __init__(self, cfg, tokenizer=None, pad_token_id: int = 0):
        super().__init__(cfg, tokenizer, pad_token_id)
        self.n_original: int | None = None  # the tokenizer's vocabulary before the special tokens
        if tokenizer is not None:
            self.n_original = len(tokenizer)
            tokens = self.special
            if self.options.get("all_special_tokens", False):  # the code's 15 first, then any of the task's own
                tokens = ALL_SPECIAL_TOKENS + tuple(t for t in tokens if t not in ALL_SPECIAL_TOKENS)
            tokenizer.add_special_tokens({"pad_token": PAD, "additional_special_tokens": list(tokens)})
            self.pad_token_id = tokenizer.convert_tokens_to_ids(PAD)

    # ------------------------------------------------------------ tokens
    @property
    def special(self) -> tuple[str, ...]:
        return SPECIAL_TOKENS[self.special_key]

    def sid(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def stop_ids(self) -> list[int]:
        return [self.sid(t) for t in self.special]

    def ids(self, text: str) -> list[int]:
        """`text` tokenised on its own, without a leading space (the official code's way)."""
        return self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))

    # ------------------------------------------------------------ encoding
    def segments(self, record: Record, target: str | None) -> list[Segment] | None:  # pragma: no cover
        """The record's segments; the final one is ``[marker] + target + [eos]`` (or just
        ``[marker]`` when `target` is None: the generation prompt). None drops the record."""
        raise NotImplementedError

    def target_of(self, record: Record) -> str:  # pragma: no cover
        raise NotImplementedError

    def encode(self, record: Record, limit: int | None = None) -> Example | None:
        """The training example of `record`, cut to `limit` tokens (sources first, see
        :func:`fit_segments`; ``self._cut`` counts the examples cut)."""
        segs = self.segments(record, self.target_of(record))
        if segs is None:
            return None
        if limit is not None:
            segs, cut = fit_segments(segs, limit)
            self._cut = getattr(self, "_cut", 0) + cut
        return build_example(segs)

    def prompt_limit(self) -> int | None:
        """The longest prompt: the model's positions less ``max_new_tokens`` (and within
        ``task.max_length``); None before the model's positions are known."""
        if self.max_positions is None:
            return None
        room = self.max_positions - self.max_new_tokens()
        if room < 2:
            raise KpeftError(f"task.options.max_new_tokens={self.max_new_tokens()} leaves no room for a prompt "
                             f"in the model's {self.max_positions} positions; lower it")
        return min(room, self.input_limit())

    def prompt(self, record: Record) -> tuple[list[int], list[int]] | None:
        """(input ids, token types) of the generation prompt, ending with the target marker, its
        sources cut so that prompt + ``max_new_tokens`` fit the model (``self._prompts_cut``)."""
        segs = self.segments(record, None)
        if segs is None:
            return None
        limit = self.prompt_limit()
        if limit is not None:
            segs, cut = fit_segments(segs, limit)
            if cut and self.truncation == "error":
                raise KpeftError(f"a generation prompt of task '{self.name}' is longer than {limit} tokens (the "
                                 "model's positions less task.options.max_new_tokens; task.truncation=error): "
                                 "lower max_new_tokens or set task.truncation=truncate")
            self._prompts_cut = getattr(self, "_prompts_cut", 0) + cut
        ex = build_example(segs)
        return ex["input_ids"], ex["token_type_ids"]

    def _cap(self, items: list, split: str) -> list:
        key = "max_train_examples" if split == "train" else "max_eval_examples"
        cap = self.options.get(key)
        return items if cap is None else items[: int(cap)]

    def loss_records(self, split: str) -> list[Record]:
        """The records whose targets give the split's loss (default: :meth:`records`)."""
        return self.records(split)

    def generation_records(self, split: str) -> list[Record]:
        """What is generated for and scored on `split` (default: :meth:`records`)."""
        return self.records(split)

    def load_splits(self) -> dict[str, list[Example]]:
        if self.tokenizer is None:
            raise KpeftError(f"task '{self.name}' needs the GPT-2 tokenizer (model.tokenizer=DIR)")
        limit = self.input_limit()
        self.prompt_limit()  # a max_new_tokens that leaves no room is refused now, not after training
        out, counts = {}, {}
        for split in ("train", "validation", "test"):
            key = "max_train_examples" if split == "train" else "max_eval_examples"
            cap = self.options.get(key)
            if split != "train" and self.options.get("max_loss_examples") is not None:
                cap = self.options.get("max_loss_examples")  # the loss only; generation keeps max_eval_examples
            out[split] = []
            self._cut = 0
            for record in self.loss_records(split):  # encode lazily: a cap avoids tokenising it all
                if cap is not None and len(out[split]) >= int(cap):
                    break
                encoded = self.encode(record, limit)
                if encoded is not None:
                    out[split].append(encoded)
            counts[split] = (self._cut, len(out[split]))
            if self._cut and self.truncation == "error":
                raise refuse_long(self._cut, len(out[split]), split, limit)
        warn_truncated(counts, limit, "examples' sources")
        return out

    # ------------------------------------------------------------ batching and loss
    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = super().collate(examples)
        width = batch["input_ids"].shape[1]
        batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], width, self.pad_token_id)
        return batch

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Input ids, mask and the token types (the task embeddings); the loss reads the logits of
        the target positions only (:meth:`~kpeft.tasks.base.Task.scored_logits_and_labels`)."""
        return {**super().model_inputs(batch), "token_type_ids": batch["token_type_ids"]}

    # ------------------------------------------------------------ task embeddings
    def new_tokens(self) -> NewTokens | None:
        """``<pad>`` and the special tokens: rows from the tokenizer's original size on, embedded
        as tokens and as token types (see the module docstring)."""
        if self.tokenizer is None or self.n_original is None:
            return None
        return NewTokens(self.n_original, len(self.tokenizer), token_types=True)

    # ------------------------------------------------------------ generation
    def max_new_tokens(self) -> int:
        """``decode.max_new_tokens``, else ``task.options.max_new_tokens`` (40)."""
        return self.decoding.tokens(self.options.get("max_new_tokens", 40))

    def generate(self, model, records: Sequence[Record], batch_size: int = 16) -> list[str]:
        from kpeft.training.decode import decode

        prompts = [self.prompt(r) for r in records]
        outputs = decode(
            model, [p[0] for p in prompts], self.decoding, token_types=[p[1] for p in prompts],
            gen_token_type=prompts[0][1][-1] if prompts else None, max_new_tokens=self.max_new_tokens(),
            stop_ids=self.stop_ids, pad_id=self.pad_token_id, batch_size=batch_size,
        )
        return [self.tokenizer.decode(o, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
                for o in outputs]

    def score_generations(self, records: list[Record], predictions: list[str]) -> tuple[dict[str, Any], list[dict]]:
        """(metrics, per-example rows) of `predictions` for `records`, by the task's official scorer:
        the one way to the task's metrics, for the training loop's evaluation, ``kpeft.score``
        (:meth:`score`) and ``kpeft.bench``."""  # pragma: no cover
        raise NotImplementedError

    score_units = "items"  # what one line of a predictions file is, in the count error

    def scored_records(self, split: str) -> list[Record]:
        """The records a predictions file of `split` answers, one per line (the generation records)."""
        return self.generation_records(split)

    def score(self, predictions: Any, split: str = "test") -> dict[str, Any]:
        """``kpeft.score``: :meth:`score_generations` of the split's :meth:`scored_records`, so a
        run's generations rescore to exactly its record (the same keys, ``bleu_all``, ...)."""
        split = canonical_split(split)
        records = self.scored_records(split)
        self.check_count(predictions, len(records), self.score_units, split)
        return self.score_generations(records, predictions)[0]

    @torch.no_grad()
    def evaluate_generation(self, model, split: str, run_dir: str | Path | None = None,
                            batch_size: int = 16, accelerator=None) -> dict[str, Any]:
        """Generate for the split, score it officially, write ``generations/<split>.jsonl``.

        With an `accelerator` of several processes, process r decodes items r, r + world, …; the
        predictions are gathered back into split order and scored on the main process, whose
        metrics every process returns (the same numbers as one process decoding everything)."""
        model.eval()
        records = self._cap(self.generation_records(split), split)
        if self.generation_limit:  # validation by a metric (train.val_generation_examples)
            records = records[: int(self.generation_limit)]
        if not records:
            return {}
        batch_size = int(self.options.get("generation_batch_size") or batch_size)
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        self._prompts_cut = 0
        mine = self.generate(getattr(model, "module", model), records[rank::world], batch_size)
        if self._prompts_cut and split not in self.__dict__.setdefault("_warned_prompts", set()):
            self._warned_prompts.add(split)  # once per split, not at every evaluation
            warn_truncated({split: (self._prompts_cut, len(records[rank::world]))}, self.prompt_limit(),
                           "generation prompts' sources")
        predictions = gather_in_order(mine, rank, world)
        metrics: dict[str, Any] = {}
        if rank == 0:
            metrics, rows = self.score_generations(records, predictions)
            if run_dir is not None:
                path = Path(run_dir) / "generations" / f"{split}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
                log.info("%d generations of split %s written to %s", len(rows), split, path)
        if world > 1:
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics])[0]
        return metrics


def gather_in_order(mine: list, rank: int, world: int) -> list:
    """Every process's items ``rank, rank + world, …`` gathered to all processes in split order."""
    if world == 1:
        return list(mine)
    from accelerate.utils import gather_object

    indexed = gather_object([(rank + world * k, item) for k, item in enumerate(mine)])
    return [item for _, item in sorted(indexed, key=lambda pair: pair[0])]


def flat_metrics(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"bleu": {"all": x}}`` → ``{"bleu_all": x}`` (records keep numbers at the top level)."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{key}_"))
        else:
            out[key] = v
    return out
