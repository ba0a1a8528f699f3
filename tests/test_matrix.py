"""One test matrix (after PEFT's ``tests/testing_common.py``): a list of (method × budget × backbone
family) cases, and the generic checks that every case must pass. A method's own test file keeps
only what is specific to it (its equations, its options, the papers' counts).

Generic checks, on every case unless the case says otherwise:
- the trained tensors are exactly what ``kpeft.count`` counts (and what the adapter state holds);
- a zero-initialised method gives the frozen backbone's outputs (``zero``);
- merge gives the unmerged outputs and unmerge restores every weight (``merge``);
- save → load on a fresh backbone gives the same outputs;
- cached decoding equals a full recompute (decoders: GPT-2, Llama, T5's decoder);
- a padded batch equals its rows one by one (and left-padded generation, decoders);
- gradients reach exactly the trainable tensors.

A new method gets its rows in ``CASES`` (docs/extending.md, "Adding a method").
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    FAMILIES,
    SEQ,
    check_batched_left_padded_generation,
    check_merge_round_trip,
    config,
    inputs,
    output,
)

from kpeft.api import load_adapter, save_adapter
from kpeft.backbones import HEADS_OF_FAMILY, describe
from kpeft.backbones.cache_api import cache_arg
from kpeft.backbones.loading import load_model
from kpeft.count import count_parameters
from kpeft.methods import AdaptedModel, ParamCount, apply_method

ALL = list(FAMILIES)  # gpt2, roberta_cls (classification head), roberta_base (hidden states), t5, llama
FOUR = ["gpt2", "roberta_cls", "t5", "llama"]
FOUR_BASE = ["gpt2", "roberta_base", "t5", "llama"]  # attention sites: RoBERTa's hidden states
DECODERS = {"gpt2", "llama", "t5"}  # a KV cache (T5: its decoder)
MASK_METHODS = {"prefix", "mam_adapter", "inducer", "inducer_adaptive", "inducer_gating", "inducer_extension",
                "inducer_lora", "mam_inducer", "mh_parallel_adapter", "prompt_tuning"}  # attention / input sites


@dataclass(frozen=True)
class Case:
    """One row of the matrix: `method` at `budget` (+ Hydra `overrides`) on a tiny `family` model."""

    method: str
    family: str
    budget: str = "small"
    overrides: tuple[str, ...] = ()
    tag: str = ""  # names the overrides in the test id
    zero: str | None = "exact"  # starts at the frozen model: "exact" (bit for bit); "eager" / "eager~" (an
    # attention site runs its own eager attention: bit for bit / to 1e-6 of the frozen model run eagerly);
    # None (it starts elsewhere)
    merge: bool = False  # folds into the frozen weights with AdaptedModel.merge()

    def __str__(self) -> str:
        return f"{self.method}{f'[{self.tag}]' if self.tag else ''}-{self.family}"


def rows(method: str, families, **kw) -> list[Case]:
    return [Case(method, f, **kw) for f in families]


KRONA = ("budget.krona.a_shape=[4,8]", "budget.krona.b_shape=[8,4]")  # shapes for the tiny width 32
KRONA_B = ("budget.krona_b.a_shape=[4,8]", "budget.krona_b.b_shape=[8,4]")
ZERO_VALUE = ("method.components.inducer.init=zero_value",)  # MLP_v ≡ 0: the frozen model
KERNEL = {"kernel_mix_lite_qv": "small", "kernel_mix_qvo": "intermediate", "kernel_wise_lite_qv": "small",
          "kernel_wise_mq": "intermediate", "kernel_wise_mv": "intermediate", "kernel_wise_qvo": "intermediate"}

CASES: list[Case] = [
    *rows("lora", ALL, merge=True),
    *rows("bitfit", FOUR),  # T5 / Llama: zero biases added (the Compacter code's BitFit)
    *rows("finetune", FOUR),
    *rows("adapter", ALL, overrides=("method.components.adapter.init=lora",), tag="zero_up"),
    *rows("adapter", ALL, overrides=("method.components.adapter.init=lora",
                                     "method.components.adapter.placement=attn_out"), tag="attn_out"),
    *rows("adapter", ["gpt2"], zero=None),  # Lin et al.'s HF-normal init: not the frozen model
    *rows("parallel_adapter", ALL),
    *rows("compacter", ["gpt2", "t5"], budget="tiny", overrides=("budget.compacter.bottleneck=8",), zero=None),
    *rows("mam_adapter", ["gpt2", "llama"], budget="intermediate", zero=None,
          overrides=("budget.mam_adapter.bottleneck=8", "method.components.prefix.mid_dim=16")),
    *rows("mam_inducer", ["gpt2"], budget="intermediate", overrides=("budget.mam_inducer.bottleneck=8",), zero=None),
    *(c for m, b in KERNEL.items() for c in rows(m, FOUR, budget=b, merge=True)),
    *rows("krona", ["gpt2", "roberta_cls", "roberta_base", "t5"], budget="t5_glue", overrides=KRONA, merge=True),
    Case("krona", "llama", "t5_glue", ("budget.krona.a_shape=[4,8]", "budget.krona.b_shape=null"), merge=True),
    *rows("krona_b", ALL, budget="t5_glue", overrides=KRONA_B),
    *rows("krona_b_res", ALL, budget="t5_glue", overrides=KRONA_B, zero=None),  # + s_res·X at step 0
    *rows("mh_parallel_adapter", FOUR, zero="eager~"),
    *rows("inducer", FOUR_BASE, budget="intermediate", overrides=ZERO_VALUE, tag="zero_value", zero="eager"),
    *rows("inducer_adaptive", FOUR_BASE, budget="intermediate", overrides=ZERO_VALUE, tag="zero_value", zero="eager"),
    *rows("inducer_gating", ["gpt2"], budget="intermediate", zero=None),
    *rows("inducer_extension", ["gpt2"], budget="intermediate", zero=None),
    *rows("inducer_lora", ["gpt2", "llama"], budget="intermediate", zero=None),
    *rows("prefix", FOUR_BASE, zero=None),
    *rows("prompt_tuning", ALL, overrides=("budget.prompt_tuning.length=3",), zero=None),
    *rows("said", FOUR, overrides=("method.components.said.d=16",)),
    *rows("ia3", ALL, merge=True),  # the worked example of docs/extending.md
]


def cases(keep=lambda c: True):
    return pytest.mark.parametrize("case", [c for c in CASES if keep(c)], ids=str)


# ---------------------------------------------------------------- building (once per case)
@functools.cache
def _model_cfg(family: str):
    return config(f"model={FAMILIES[family][0]}").model


@functools.cache
def _backbone(family: str) -> torch.nn.Module:
    _, head, num_labels = FAMILIES[family]
    return load_model(_model_cfg(family), head, num_labels=num_labels, seed=0).float().eval()


def backbone(family: str) -> torch.nn.Module:
    """A fresh copy of the tiny random `family` model (built once per session)."""
    return copy.deepcopy(_backbone(family))


@functools.cache
def _method_cfg(method: str, budget: str, overrides: tuple[str, ...]):
    cfg = config(f"method={method}", f"budget={budget}", *overrides)
    from omegaconf import OmegaConf

    OmegaConf.resolve(cfg)
    return cfg.method


@dataclass
class Built:
    adapted: AdaptedModel
    batch: dict
    frozen: torch.Tensor  # the backbone's output before the method
    at_init: torch.Tensor  # the output right after installing it
    backbone_ids: set  # ids of the backbone's own parameters


@torch.no_grad()
def perturb(adapted: AdaptedModel, scale: float = 0.2, seed: int = 3) -> None:
    """Move every trainable tensor by random noise (zero-initialised factors become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in adapted.trainable_parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


@functools.cache
def built(case: Case) -> Built:
    """`case` installed on a fresh backbone, then perturbed; shared by the checks, which restore it."""
    model = backbone(case.family)
    batch = inputs(case.family)
    frozen = output(model, batch)
    ids = {id(p) for p in model.parameters()}
    mcfg = _method_cfg(case.method, case.budget, case.overrides)
    adapted = apply_method(model, describe(model), mcfg)
    adapted.method_cfg = mcfg
    model.eval()  # the new components too (dropout)
    at_init = output(model, batch)
    perturb(adapted)
    return Built(adapted, batch, frozen, at_init, ids)


def meta_count(case: Case, adapted: AdaptedModel) -> ParamCount:
    """``kpeft.count``'s count of the case (meta device); on a head other than the one it builds
    (RoBERTa's classifier has no pooler), the same recipe on the case's head."""
    _, head, num_labels = FAMILIES[case.family]
    cfg = _model_cfg(case.family)
    if head == HEADS_OF_FAMILY[adapted.anatomy.family][0]:
        return count_parameters(SimpleNamespace(model=cfg, method=adapted.method_cfg, fidelity="paper"))
    model = load_model(cfg, head, num_labels=num_labels, meta=True)
    return apply_method(model, describe(model), adapted.method_cfg).count()


def trained_names(adapted: AdaptedModel) -> set[str]:
    return {n for n, _ in adapted.trainable_parameters()}


# ---------------------------------------------------------------- the checks
@cases()
def test_the_trained_tensors_are_what_kpeft_count_counts(case):
    b = built(case)
    adapted = b.adapted
    head = {id(p) for p in adapted.anatomy.task_head_params}
    trainable = adapted.trainable_parameters()
    counted = sum(p.numel() for _, p in trainable if id(p) not in head)
    meta = meta_count(case, adapted)
    assert counted == adapted.count().trainable == meta.trainable > 0
    assert adapted.count().uncounted == sum(p.numel() for p in adapted.anatomy.task_head_params)
    # Everything the method added trains; a backbone tensor trains only as the task head or when a
    # parameters-site component (BitFit, fine-tuning, LayerNorm tuning) selects it.
    added = [n for n, p in adapted.model.named_parameters() if id(p) not in b.backbone_ids]
    assert all(dict(adapted.model.named_parameters())[n].requires_grad for n in added)
    selected = {id(p) for c in adapted.all_components() if c.site == "parameters" for _, p in c.select(adapted.model)}
    assert {id(p) for _, p in trainable if id(p) in b.backbone_ids} == (selected | head) & b.backbone_ids
    assert set(adapted.adapter_state_dict()) == trained_names(adapted)


@cases(lambda c: c.zero is not None)
def test_a_zero_initialised_method_gives_the_frozen_outputs(case):
    b = built(case)
    if case.zero == "exact":
        assert torch.equal(b.at_init, b.frozen)
    else:  # the attention site runs its own (eager) attention
        eager = backbone(case.family)
        eager.set_attn_implementation("eager")
        tol = 1e-6 if case.zero == "eager~" else 0.0
        torch.testing.assert_close(b.at_init, output(eager, b.batch), rtol=0, atol=tol)


@cases()
def test_mergeability_is_as_declared(case):
    adapted = built(case).adapted
    assert (adapted.mergeable and bool(adapted.projections())) == case.merge


@cases(lambda c: c.merge)
def test_merge_equals_unmerged_and_unmerge_restores_the_weights(case):
    b = built(case)
    adapted, batch = b.adapted, b.batch
    exact = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    unmerged = output(adapted.model, batch)
    assert (unmerged - b.frozen).abs().max() > 1e-3  # the delta is far above the tolerance
    branches = [branch for p in adapted.projections() for branch in p.branches]
    try:
        check_merge_round_trip(adapted, batch, branches, unmerged)
        adapted.merge()
        adapted.merge()  # merging twice is a no-op, not a double delta
        torch.testing.assert_close(output(adapted.model, batch), unmerged, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge"):
            adapted.adapter_state_dict()  # merged weights would be saved twice
        adapted.unmerge()
        torch.testing.assert_close(output(adapted.model, batch), unmerged, rtol=1e-5, atol=1e-5)
    finally:  # the shared model goes back bit for bit (W + ΔW − ΔW rounds)
        if adapted.merged:
            adapted.unmerge()
        with torch.no_grad():
            for n, p in adapted.model.named_parameters():
                p.copy_(exact[n])


@cases()
def test_save_then_load_on_a_fresh_backbone_gives_the_same_outputs(case, tmp_path):
    b = built(case)
    adapted, batch = b.adapted, b.batch
    want = output(adapted.model, batch)
    assert (want - b.frozen).abs().max() > 1e-4  # the perturbed method acts
    save_adapter(adapted, tmp_path)
    fresh = backbone(case.family)
    loaded = load_adapter(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(output(fresh, batch), want)
    assert loaded.count() == adapted.count()
    state = adapted.adapter_state_dict()
    with pytest.raises(KeyError, match="missing"):
        loaded.load_adapter_state_dict(dict(list(state.items())[1:]))


@torch.no_grad()
def _incremental_logits(model, ids: torch.Tensor, prompt: int = 3) -> torch.Tensor:
    name = cache_arg(model)
    out = model(input_ids=ids[:, :prompt], use_cache=True)
    logits = [out.logits]
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: getattr(out, name)})
        logits.append(out.logits)
    return torch.cat(logits, 1)


@torch.no_grad()
def _incremental_seq2seq_logits(model, batch: dict) -> torch.Tensor:
    enc = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    dec, mask = batch["decoder_input_ids"], batch["attention_mask"]
    name = cache_arg(model)
    out = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :1], use_cache=True)
    logits = [out.logits]
    for t in range(1, dec.shape[1]):
        out = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t:t + 1], use_cache=True,
                    **{name: getattr(out, name)})
        logits.append(out.logits)
    return torch.cat(logits, 1)


@cases(lambda c: c.family in DECODERS)
def test_cached_decoding_equals_a_full_recompute(case):
    b = built(case)
    model = b.adapted.model
    if case.family == "t5":
        cached = _incremental_seq2seq_logits(model, b.batch)
        with torch.no_grad():
            full = model(**b.batch, use_cache=False).logits
    else:
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(4))
        cached = _incremental_logits(model, ids)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@cases()
def test_a_padded_batch_equals_its_rows_one_by_one(case):
    """Row 0 has two right pads; each row alone, without padding, gives its real tokens' outputs."""
    b = built(case)
    model, batch = b.adapted.model, b.batch
    together = output(model, batch)
    per_sequence = FAMILIES[case.family][1] == "classification"
    for row, real in ((0, SEQ - 2), (1, SEQ)):
        alone = {k: v[row:row + 1, :real] if k in ("input_ids", "attention_mask") else v[row:row + 1]
                 for k, v in batch.items()}
        got = output(model, alone)[0]
        want = together[row] if per_sequence or case.family == "t5" else together[row, :real]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@cases(lambda c: c.family in ("gpt2", "llama") and c.method in MASK_METHODS)
def test_left_padded_generation_equals_one_by_one(case):
    """Methods that add keys, queries or tokens (their own masks and positions); a weight or block
    site leaves the masks to the backbone (its padded batch: the check above)."""
    model = built(case).adapted.model
    check_batched_left_padded_generation(model, torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(4)))


@cases()
def test_gradients_reach_exactly_the_trainable_tensors(case):
    """In training mode (dropout and the training-only paths of the components act)."""
    b = built(case)
    model = b.adapted.model.train()
    torch.manual_seed(0)
    out = model(**b.batch, use_cache=False) if case.family in DECODERS else model(**b.batch)
    main = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    extra = getattr(out, "pooler_output", None)
    loss = main.pow(2).mean() + (0 if extra is None else extra.pow(2).mean())
    loss.backward()
    try:
        reached = {n for n, p in model.named_parameters() if p.grad is not None}
        assert reached == trained_names(b.adapted)
        zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
        assert zero == []
    finally:
        model.eval()
        for p in model.parameters():
            p.grad = None
