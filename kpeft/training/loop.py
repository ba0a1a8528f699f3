"""The training loop: one loop on `accelerate` for CPU, one GPU, or several (DDP).

Per optimizer step it consumes one global batch (``train.batch_size`` examples split over
processes and ``train.grad_accum`` micro-batches), normalises the summed loss by the global
number of scored units (examples or target tokens), clips, steps AdamW and the linear
warm-up/decay schedule. Each epoch ends (and, with ``train.eval_every_steps``, every so many steps
go on) with a validation: the loss, and the ``train.select_by`` metric when the best checkpoint is
chosen by one (:mod:`kpeft.training.selection`; generation tasks decode the first
``train.val_generation_examples`` items); it picks the best checkpoint and drives early stopping;
checkpoints every ``train.checkpoint_every_steps`` steps and at epoch ends make a
killed run resumable with identical results.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from kpeft.errors import KpeftError
from kpeft.methods import AdaptedModel
from kpeft.tasks import Task
from kpeft.training import checkpoint as ckpt
from kpeft.training.data import (
    epoch_order,
    eval_batches,
    length_grouped_order,
    padding_fraction,
    step_batches,
    steps_per_epoch,
)
from kpeft.training.memory import enable_gradient_checkpointing
from kpeft.training.optim import build_optimizer, linear_schedule, warmup_steps
from kpeft.training.selection import improves, mode
from kpeft.training.tracking import MetricsLogger

log = logging.getLogger(__name__)


class SimulatedCrash(RuntimeError):
    """Raised by ``train.crash_after_steps`` (tests of resumption)."""


@dataclass
class LoopState:
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps already done in this epoch
    global_step: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # validations in a row without a better select_by value
    best_score: float | None = None  # the best select_by value
    best_step: int = -1
    last_val_step: int = -1
    stopped_early: bool = False
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def make_accelerator(tcfg: DictConfig) -> Accelerator:
    """An Accelerator with autocast on GPUs: bf16 where supported, else fp16; none on CPU."""
    from accelerate.utils import DistributedDataParallelKwargs

    mp = tcfg.mixed_precision
    if mp == "auto":
        if torch.cuda.is_available():
            mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mp = "no"
    if mp != "no" and not torch.cuda.is_available():
        raise KpeftError(f"train.mixed_precision={mp} needs a GPU; use train.mixed_precision=no on CPU")
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, torchrun on CPUs would not form a gloo group
        mixed_precision=mp, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )


class OneForward:
    """Calls `model` once per set of input tensors: a second call with the very same tensors (the
    loss, the metrics and the example scores of one evaluation batch) reuses the first output."""

    def __init__(self, model):
        self.model, self.inputs, self.output = model, None, None

    def __call__(self, **inputs):
        same = self.inputs is not None and self.inputs.keys() == inputs.keys() and all(
            self.inputs[k] is v for k, v in inputs.items())
        if not same:
            self.inputs, self.output = inputs, self.model(**inputs)
        return self.output


class Trainer:
    """Fits an adapted model on a task; see the module docstring."""

    def __init__(
        self,
        cfg: DictConfig,
        adapted: AdaptedModel,
        task: Task,
        splits: dict[str, list],
        run_dir: Path,
        accelerator: Accelerator,
    ):
        self.cfg, self.tcfg = cfg, cfg.train
        self.adapted, self.task, self.splits = adapted, task, splits
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        self.world = accelerator.num_processes
        if self.tcfg.batch_size % (self.world * self.tcfg.grad_accum):
            raise KpeftError(
                f"train.batch_size={self.tcfg.batch_size} (global) must be divisible by processes × "
                f"train.grad_accum = {self.world} × {self.tcfg.grad_accum}"
            )
        n_train = len(splits["train"])
        if n_train == 0:
            raise KpeftError(f"task '{task.name}' has no training examples; check task.data_dir")
        self.steps_per_epoch = steps_per_epoch(n_train, self.tcfg.batch_size)
        self.total_steps = self.tcfg.max_steps or self.tcfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        if self.tcfg.gradient_checkpointing:
            enable_gradient_checkpointing(adapted.model)
        optimizer = build_optimizer(adapted.trainable_parameters(), self.tcfg)
        self.scheduler = linear_schedule(optimizer, warmup_steps(self.tcfg, self.total_steps), self.total_steps)
        self.model, self.optimizer = accelerator.prepare(adapted.model, optimizer)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------ evaluation
    @parametrize.cached()  # reparameterised weights (SAID) formed once per evaluation
    @torch.no_grad()
    def evaluate_loss(self, split: str = "validation") -> float:
        """Mean NLL (no label smoothing) over the split's scored units."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        for batch in eval_batches(self.splits[split], self.tcfg.eval_batch_size, self.acc.process_index,
                                  self.world, self.task.collate):
            loss, count = self.task.loss(self.model, self._to_device(batch))
            total += torch.tensor([float(loss), count], dtype=torch.float64, device=self.acc.device)
        total = self.acc.reduce(total, "sum")
        return float(total[0] / total[1]) if total[1] > 0 else math.nan

    @parametrize.cached()
    @torch.no_grad()
    def evaluate(self, split: str = "test", save_examples: bool | None = False) -> dict[str, float]:
        """The task's metrics (and NLL) on a split, summed over all processes (`save_examples` None:
        nothing written, as for validations); with `save_examples`
        a classification task's per-example scores go to ``<run_dir>/predictions/<split>.jsonl``.

        A task with ``generates`` (the NLG tasks, :mod:`kpeft.tasks.nlg`) is scored on its generations
        instead (``Task.evaluate_generation``) (each process decodes
        every world-th item; the main one scores them all and writes ``<run_dir>/generations/``)."""
        self.model.eval()
        if self.task.generates:
            run_dir = self.run_dir if self.acc.is_main_process and save_examples is not None else None
            metrics = self.task.evaluate_generation(self.model, split, run_dir, self.tcfg.eval_batch_size,
                                                    accelerator=self.acc)
            metrics["loss"] = self.evaluate_loss(split)
            return metrics
        # One forward per batch serves the metrics, the loss and the per-example scores of a classifier.
        model = OneForward(self.model) if self.task.kind == "classification" else self.model
        totals: dict[str, float] = {}
        loss = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        rows: list[dict[str, Any]] | None = [] if save_examples else None
        for batch in eval_batches(self.splits[split], self.tcfg.eval_batch_size, self.acc.process_index,
                                  self.world, self.task.collate):
            batch = self._to_device(batch)
            for k, v in self.task.batch_metrics(model, batch).items():
                totals[k] = totals.get(k, 0.0) + v
            loss_sum, count = self.task.loss(model, batch)
            loss += torch.tensor([float(loss_sum), count], dtype=torch.float64, device=self.acc.device)
            if rows is not None:
                scored = self.task.example_scores(model, batch)
                rows = None if scored is None else rows + scored
        keys = sorted(totals)
        vec = self.acc.reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.acc.device), "sum")
        metrics = self.task.finalize(dict(zip(keys, vec.tolist())))
        loss = self.acc.reduce(loss, "sum")
        metrics["loss"] = float(loss[0] / loss[1]) if loss[1] > 0 else math.nan
        if rows is not None:
            self._write_example_scores(split, rows)
        return metrics

    def _write_example_scores(self, split: str, rows: list[dict[str, Any]]) -> None:
        """``<run_dir>/predictions/<split>.jsonl``: one row per example in split order (index,
        prediction, label, score), gathered from every process; the paired bootstrap reads it."""
        mine = list(range(self.acc.process_index, len(self.splits[split]), self.world))
        for index, row in zip(mine, rows):
            row["index"] = index
        if self.world > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        if self.acc.is_main_process:
            path = self.run_dir / "predictions" / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for row in sorted(rows, key=lambda r: r["index"]):
                    f.write(json.dumps({"index": row["index"], **{k: row[k] for k in ("prediction", "label", "score")}}) + "\n")
            tmp.replace(path)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    # ------------------------------------------------------------ training
    def fit(self) -> LoopState:
        state = LoopState()
        last_dir = self.ckpt_dir / "last"
        resumable = ckpt.find_resumable(last_dir) if self.cfg.resume else None
        if resumable is not None:
            loop = ckpt.load_training_state(resumable, self.adapted, self.optimizer, self.scheduler, self.cfg, self.acc)
            state = LoopState(**loop)
            log.info("resumed from %s at step %d (epoch %d)", resumable, state.global_step, state.epoch)
        elif self.cfg.resume:
            log.info("resume=true but no checkpoint in %s: starting from scratch", last_dir)
        logger = MetricsLogger(self.run_dir, self.cfg, self.acc.is_main_process,
                               resume_step=state.global_step if resumable else None)
        bar = tqdm(total=self.total_steps, initial=state.global_step, desc="train", unit="step",
                   disable=not (self.tcfg.progress and self.acc.is_main_process), dynamic_ncols=True)
        try:
            self._fit_epochs(state, logger, bar, last_dir)
        finally:
            bar.close()
            logger.close()
        return state

    def _fit_epochs(self, state: LoopState, logger: MetricsLogger, bar, last_dir: Path) -> None:
        examples = self.splits["train"]
        has_val = len(self.splits.get("validation", [])) > 0
        while state.epoch < self.epochs and not state.stopped_early:
            order = self.epoch_order(state.epoch)
            self.model.train()
            start = time.perf_counter()
            while state.step_in_epoch < self.steps_per_epoch and state.global_step < self.total_steps \
                    and not state.stopped_early:
                loss = self._optimizer_step(examples, order, state.step_in_epoch)
                state.step_in_epoch += 1
                state.global_step += 1
                lr = self.scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                logger.log(state.global_step, state.epoch + state.step_in_epoch / self.steps_per_epoch,
                           {"train/loss": loss, "train/lr": lr})
                if state.global_step == self.tcfg.crash_after_steps:
                    raise SimulatedCrash(f"simulated crash after step {state.global_step}")
                every = self.tcfg.eval_every_steps
                if every and has_val and state.global_step % every == 0 and state.step_in_epoch < self.steps_per_epoch:
                    state.train_seconds += time.perf_counter() - start
                    entry = {"epoch": state.epoch, "step": state.global_step}
                    self._validate(state, logger, entry)
                    state.history.append(entry)
                    self.model.train()
                    start = time.perf_counter()
                if self.tcfg.checkpoint_every_steps and state.global_step % self.tcfg.checkpoint_every_steps == 0 \
                        and state.step_in_epoch < self.steps_per_epoch:
                    state.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    ckpt.save_training_state(last_dir, self.adapted, self.optimizer, self.scheduler,
                                             asdict(state), self.cfg, self.acc)
            state.train_seconds += time.perf_counter() - start
            self._end_epoch(state, logger, has_val)
            ckpt.save_training_state(last_dir, self.adapted, self.optimizer, self.scheduler, asdict(state), self.cfg, self.acc)

    @property
    def group_by_length(self) -> bool:
        """``train.group_by_length``; unset: on for generation tasks (causal LM, seq2seq)."""
        flag = self.tcfg.group_by_length
        return self.task.kind in ("causal_lm", "seq2seq") if flag is None else bool(flag)

    def epoch_order(self, epoch: int) -> list[int]:
        """The example order of `epoch`: shuffled, length-grouped with :attr:`group_by_length`."""
        examples = self.splits["train"]
        if not self.group_by_length:
            return epoch_order(len(examples), self.cfg.seed, epoch)
        lengths = [len(e["input_ids"]) for e in examples]
        return length_grouped_order(lengths, self.cfg.seed, epoch, self.tcfg.batch_size)

    def _optimizer_step(self, examples: list, order: list[int], step: int) -> float:
        micro = step_batches(examples, order, step, self.tcfg.batch_size, self.tcfg.grad_accum,
                             self.acc.process_index, self.world, self.task.collate)
        micro = [self._to_device(b) for b in micro]
        local = sum(self.task.units(b) for b in micro)
        units = float(self.acc.reduce(torch.tensor(float(local), device=self.acc.device), "sum"))
        total_loss = torch.zeros((), device=self.acc.device)
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = torch.enable_grad() if sync else self.acc.no_sync(self.model)
            with ctx:
                loss_sum, _ = self.task.loss(self.model, batch, self.tcfg.label_smoothing)
                # DDP averages gradients over processes, hence the × world.
                self.acc.backward(loss_sum * (self.world / max(units, 1.0)))
            total_loss += loss_sum.detach()
        gradient_only = self.adapted.gradient_only_parameters()  # fidelity=code: frozen rows, clipping only
        if self.tcfg.max_grad_norm and self.tcfg.max_grad_norm > 0:
            self._unscale(gradient_only)
            self.acc.clip_grad_norm_(self.model.parameters(), self.tcfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in gradient_only:
            p.grad = None
        return float(self.acc.reduce(total_loss, "sum")) / max(units, 1.0)

    def _unscale(self, params: list) -> None:
        """fp16: unscale gradients outside the optimizer, which accelerate's clipping does not."""
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            for p in params:
                if p.grad is not None:
                    p.grad.div_(scaler.get_scale())

    def _end_epoch(self, state: LoopState, logger: MetricsLogger, has_val: bool) -> None:
        entry: dict[str, float] = {"epoch": state.epoch, "step": state.global_step}
        if has_val and self.tcfg.eval_every_epoch:
            if state.last_val_step != state.global_step:  # not validated at this very step already
                self._validate(state, logger, entry)
                state.history.append(entry)
        else:  # no validation split: the last epoch is the best
            state.best_epoch, state.best_step = state.epoch, state.global_step
            self._save_best()
            state.history.append(entry)
        state.epoch += 1
        state.step_in_epoch = 0
        self.model.train()

    def validation_metrics(self) -> dict[str, float]:
        """The task's metrics on the validation split (generation tasks: its first
        ``train.val_generation_examples`` items, nothing written)."""
        cap = self.tcfg.val_generation_examples
        self.task.generation_limit = cap if self.task.generates else None
        try:
            return self.evaluate("validation", save_examples=None)
        finally:
            self.task.generation_limit = None

    def _validate(self, state: LoopState, logger: MetricsLogger, entry: dict[str, float]) -> None:
        """One validation: the loss (and the select_by metric); keep the best, count for early stopping."""
        by = self.tcfg.select_by
        metrics = None if by == "val_loss" else self.validation_metrics()  # its "loss" is evaluate_loss's
        val = self.evaluate_loss("validation") if metrics is None else metrics["loss"]
        entry["val_loss"] = val
        logged = {"val/loss": val}
        value = val
        if metrics is not None:
            if not isinstance(metrics.get(by), (int, float)):
                have = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
                raise KpeftError(f"train.select_by={by} is not a validation metric of task '{self.task.name}'; "
                                 f"valid: val_loss, {have}")
            value = float(metrics[by])
            entry[f"val_{by}"] = value
            logged[f"val/{by}"] = value
        state.last_val_step = state.global_step
        logger.log(state.global_step, state.epoch + state.step_in_epoch / self.steps_per_epoch, logged)
        log.info("epoch %d step %d: validation loss %.4f%s", state.epoch + 1, state.global_step, val,
                 "" if by == "val_loss" else f", {by} {value:.4f}")
        if math.isfinite(val):
            state.best_val_loss = min(state.best_val_loss, val)
        if improves(value, state.best_score, by):
            state.best_score, state.best_epoch, state.best_step, state.bad_epochs = value, state.epoch, state.global_step, 0
            self._save_best()
        else:
            state.bad_epochs += 1
            patience = self.tcfg.early_stopping_patience
            if patience and state.bad_epochs >= patience:
                state.stopped_early = True
                log.info("early stopping: no better validation %s for %d validations", by, patience)

    def _save_best(self) -> None:
        if self.acc.is_main_process:
            ckpt.save_adapter(self.ckpt_dir / "best", self.adapted, self.cfg)
        self.acc.wait_for_everyone()

    def load_best(self) -> None:
        best = self.ckpt_dir / "best"
        if (best / ckpt.ADAPTER_FILE).exists():
            ckpt.load_adapter(best, self.adapted)

    def summary(self, state: LoopState) -> dict[str, Any]:
        by = self.tcfg.select_by
        validated = state.best_score is not None
        out = {
            "steps": state.global_step, "epochs": state.epoch, "best_epoch": state.best_epoch,
            "best_step": state.best_step,
            "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
            "selected_by": by, "select_mode": mode(by), "best_score": state.best_score,
            "stopped_early": state.stopped_early,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.world,
            "group_by_length": self.group_by_length, "padding_fraction": round(self.padding_fraction(), 4),
        }
        if not validated:
            out["selection_note"] = ("no validation split (or train.eval_every_epoch=false): "
                                     "the last checkpoint is used; best_val_loss is null")
        return out

    def padding_fraction(self, epoch: int = 0) -> float:
        """The share of pad tokens in the training batches of `epoch` (global batches)."""
        lengths = [len(e["input_ids"]) for e in self.splits["train"]]
        return padding_fraction(lengths, self.epoch_order(epoch), self.tcfg.batch_size)
