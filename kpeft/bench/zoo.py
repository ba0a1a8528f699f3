"""The models a benchmark compares, built on one random-init backbone whose frozen tensors they
all share (one copy of GPT-2 in memory, not one per method).

Each method is composed from its real YAML at its ``intermediate`` budget, or, for methods that
budget does not size, at the first of :data:`BUDGETS` that does. Backbone tensors a method trains
(full fine-tuning, BitFit, LayerNorms) get a private copy, so an optimizer step of one method never
changes what another one computes with. PEFT's LoRA (the ``peft`` library) is the reference.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.compose import compose
from kpeft.errors import KpeftError
from kpeft.methods import AdaptedModel, apply_method
from kpeft.training.optim import build_optimizer

BUDGETS = ("intermediate", "small", "t5_glue", "tiny", "nlu")
BACKBONE, PEFT_LORA = "backbone", "peft_lora"
# PEFT's module names for W_q and W_v. GPT-2 fuses q, k, v in one Conv1D (c_attn), which PEFT can
# only adapt as a whole: LoRA-r on c_attn has exactly the parameters and FLOPs of LoRA-r on the q
# and v blocks (d·r + r·3d = 2·(d·r + r·d)).
PEFT_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
KRON_SECTIONS = {"krona": "krona", "krona_b": "krona_b", "krona_b_res": "krona_b"}


@dataclass
class Entry:
    """One model under test: a method installed on a shared backbone, or a reference."""

    name: str
    model: nn.Module
    budget: str | None = None
    adapted: AdaptedModel | None = None
    optimizer: torch.optim.Optimizer | None = None
    params: list[nn.Parameter] = field(default_factory=list)
    trainable: int = 0
    trainable_pct: float = 0.0
    first_step_s: float = 0.0  # the untimed warm-up step (it also checks that the model trains)

    @property
    def mergeable(self) -> bool:
        """Has weight-site deltas that all fold into the backbone (LoRA, Kernel-mix, KronA)."""
        return self.adapted is not None and bool(self.adapted.projections()) and self.adapted.mergeable


def base_config(model: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    return compose([f"model={model}", "model.init=random", *overrides])


def load_backbone(model: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The random-init causal LM of ``conf/model/<model>.yaml``, frozen, fp32."""
    cfg = base_config(model)
    if cfg.model.family not in PEFT_TARGETS:
        raise KpeftError(f"kpeft.bench needs a causal LM (gpt2 or llama family), not model '{model}' ({cfg.model.family})")
    net = load_model(cfg.model, "causal_lm", seed=seed).float().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy of `base` whose parameters are new ``nn.Parameter`` objects on the *same*
    storage (own ``requires_grad`` and ``.grad``; tied weights stay tied)."""
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in base.parameters()}
    return copy.deepcopy(base, memo)


def _privatise_trained(model: nn.Module, shared: set[int]) -> None:
    for p in model.parameters():
        if p.requires_grad and p.data_ptr() in shared:
            p.data = p.data.clone()


def near_square(d: int) -> tuple[list[int], list[int]]:
    """KronA factors for a d×d map with near-square A and B (768 → A (24, 32), B (32, 24))."""
    m = min((a for a in range(1, d + 1) if d % a == 0), key=lambda a: (abs(a - math.sqrt(d)), a))
    return [m, d // m], [d // m, m]


def kron_fallback(method: str, d: int) -> tuple[str, ...]:
    """Budget overrides with :func:`near_square` factors, used when the budget's shapes do not fit
    the backbone (the tiny test models)."""
    (m1, n1), (m2, n2) = near_square(d)
    section = KRON_SECTIONS[method]
    return (f"budget.{section}.a_shape=[{m1},{n1}]", f"budget.{section}.b_shape=[{m2},{n2}]")


def method_config(model: str, method: str, budgets: tuple[str, ...] = BUDGETS) -> DictConfig:
    """The composed config of `method` at the first of `budgets` that sizes it."""
    for budget in budgets:
        try:
            return base_config(model, (f"method={method}", f"budget={budget}"))
        except KpeftError as err:
            if "cannot meet budget" not in str(err):
                raise
    raise KpeftError(f"method '{method}' is sized by none of the budgets {', '.join(budgets)}")


def _optimizer(entry: Entry, cfg: DictConfig) -> None:
    named = [(n, p) for n, p in entry.model.named_parameters() if p.requires_grad]
    entry.params = [p for _, p in named]
    entry.optimizer = build_optimizer(named, cfg.train)


def build_method(base: nn.Module, model: str, method: str, budgets: tuple[str, ...] = BUDGETS) -> Entry:
    """`method` installed on a shared copy of `base`, with its AdamW optimizer."""
    cfg = method_config(model, method, budgets)
    shared = {p.data_ptr() for p in base.parameters()}
    net = shared_copy(base)
    try:
        adapted = apply_method(net, describe(net), cfg.method, cfg.fidelity)
    except KpeftError as err:
        if method not in KRON_SECTIONS or "KronA factors" not in str(err):
            raise
        cfg = base_config(model, (f"method={method}", f"budget={cfg.budget.name}",
                                  *kron_fallback(method, base.config.hidden_size)))
        net = shared_copy(base)
        adapted = apply_method(net, describe(net), cfg.method, cfg.fidelity)
    _privatise_trained(net, shared)
    count = adapted.count()
    entry = Entry(method, net, cfg.budget.name, adapted, trainable=count.trainable, trainable_pct=count.trainable_pct)
    _optimizer(entry, cfg)
    return entry


def build_peft_lora(base: nn.Module, model: str, r: int = 54, alpha: float = 32.0, dropout: float = 0.1) -> Entry:
    """PEFT's LoRA of rank `r` on W_q, W_v (GPT-2: on the fused c_attn, see PEFT_TARGETS)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise KpeftError("kpeft.bench times PEFT's LoRA as its reference: pip install peft (make install does)") from None

    family = base_config(model).model.family
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=PEFT_TARGETS[family],
                        fan_in_fan_out=family == "gpt2", bias="none")
    net = get_peft_model(shared_copy(base), config)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in base.parameters())
    entry = Entry(PEFT_LORA, net, None, trainable=trainable, trainable_pct=100.0 * trainable / total)
    _optimizer(entry, base_config(model))
    return entry


def build_backbone_entry(base: nn.Module) -> Entry:
    """The plain backbone (no method): the latency reference."""
    return Entry(BACKBONE, shared_copy(base))
