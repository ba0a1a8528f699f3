"""``python -m kpeft.export RUN_DIR --format merged|peft --out DIR``: a trained run for plain
transformers or for PEFT (``docs/generate_export.md``).

* ``merged`` — the method's weight deltas folded into the backbone, saved with ``save_pretrained``
  (+ the tokenizer): ``AutoModelFor….from_pretrained(DIR)`` alone gives kpeft's logits. Methods
  that change the computation rather than the weights (adapters, prefixes, inducers, prompts,
  SAID) are refused.
* ``peft`` — a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for
  every method whose update is exactly low-rank per weight: LoRA, and Kernel-wise / Kernel-mix
  (incl. lite), whose per-head blocks stack into one LoRA of rank heads × r per matrix (plus the
  shared rank). Scales are folded into ``lora_B`` (``lora_alpha = r``: PEFT's scaling is 1);
  trained biases become PEFT's ``lora_bias``; on GPT-2's fused ``c_attn`` (``fan_in_fan_out``)
  the q and v branches stack into one LoRA over the whole output, zero outside their column
  blocks. A trained task head goes under ``modules_to_save``. When the backbone is not a hub
  checkpoint (random init, GGUF, a local folder, or an embedding enlarged by NLG task tokens) the
  frozen base is written to ``DIR/base`` and ``base_model_name_or_path`` points at it. KronA goes to
  a PEFT LoKr adapter (``w1 = Aᵀ``, ``w2 = s·Bᵀ``) where LoKr holds it exactly (square A of one
  shape everywhere, whole ``nn.Linear`` modules); otherwise it is refused.

NLG runs: the task-embedding rows are rows of the enlarged input embedding (and of the tied LM
head); the exported model has that vocabulary and the tokenizer its added special tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from kpeft.errors import KpeftError, user_errors
from kpeft.methods import AdaptedModel
from kpeft.methods.base import AdaptedProjection, WeightComponent
from kpeft.methods.kernelwise import KernelWise, KernelWiseLite, KernelWiseOut
from kpeft.methods.kron import KronA
from kpeft.methods.lowrank import LoRA
from kpeft.methods.vocabulary import VocabularyRows, folded

FORMATS = ("merged", "peft")


# ---------------------------------------------------------------- the plain backbone
@contextlib.contextmanager
def plain_modules(adapted: AdaptedModel) -> Iterator[nn.Module]:
    """The model with every kpeft projection wrapper replaced by its frozen base module (branches
    left out) and a task's vocabulary rows folded into a plain embedding, restored afterwards."""
    swapped: list[tuple[nn.Module, str, AdaptedProjection]] = []
    for parent in list(adapted.model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, AdaptedProjection):
                swapped.append((parent, attr, child))
                setattr(parent, attr, child.base)
    try:
        with folded(adapted.model) as model:
            yield model
    finally:
        for parent, attr, wrapper in swapped:
            setattr(parent, attr, wrapper)


def _method_name(adapted: AdaptedModel) -> str:
    cfg = getattr(adapted, "method_cfg", None)
    return cfg.name if cfg is not None else "this method"


def _extra_tensors(model: nn.Module) -> list[str]:
    """State-dict keys a fresh model of the same class and config would not have (e.g. biases that
    BitFit added to a bias-free Llama)."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    return sorted(set(model.state_dict()) - set(fresh.state_dict()))


def check_mergeable(adapted: AdaptedModel) -> None:
    """One-line refusal when the method is not a pure weight change a plain model can hold."""
    name = _method_name(adapted)
    for comp in adapted.all_components():
        if comp.site != "parameters" and not (comp.site == "weight" and comp.mergeable):
            raise KpeftError(
                f"cannot export {name} merged: its {type(comp).__name__} component acts at the {comp.site} site "
                "(it changes the computation, not only the weights); use it through kpeft.load_run"
            )
    for proj in adapted.projections():
        try:
            proj.check_mergeable()
        except ValueError as err:
            raise KpeftError(f"cannot export {name} merged: {err}") from None
    with plain_modules(adapted) as model:
        extra = _extra_tensors(model)
    if extra:
        raise KpeftError(
            f"cannot export {name} merged: it adds tensors a plain {type(adapted.model).__name__} does not have "
            f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); use it through kpeft.load_run"
        )


def export_merged(adapted: AdaptedModel, out: str | Path, tokenizer=None) -> Path:
    """The merged backbone in `out` (``save_pretrained``), loadable by transformers alone."""
    check_mergeable(adapted)
    out = Path(out)
    was_merged = adapted.merged
    adapted.merge()
    try:
        with plain_modules(adapted) as model:
            model.save_pretrained(out)
    finally:
        if not was_merged:
            adapted.unmerge()
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- PEFT LoRA
def lora_factors(comp: WeightComponent) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down (R, d_in), up (d_out_block, R))`` with ``up @ down = ΔW`` of the block in
    ``nn.Linear`` orientation (``delta_weight()ᵀ``), every scale folded into ``up``."""
    s = comp.scaling
    if isinstance(comp, LoRA):
        return comp.lora_A, comp.lora_B * s
    if isinstance(comp, KernelWiseOut):  # ΔW_o[c_h, :] = Ã^(h) B̃^(h): down = blockdiag(Ã^(h)ᵀ)
        return torch.block_diag(*comp.head_in.transpose(1, 2)), comp.head_out.t() * s
    if isinstance(comp, KernelWiseLite):  # input basis of head h: (W_k^(g(h)) B_k^(h))ᵀ
        wk = comp._per_head(comp.key.weight(), 1)  # (d_in, H, p)
        down = torch.einsum("dhp,hpr->hrd", wk, comp.head_in).reshape(-1, comp.d_in)
        return down, torch.block_diag(*comp.head_out.transpose(1, 2)) * s
    if isinstance(comp, KernelWise):  # ΔW[:, c_h] = B^(h) A^(h)
        return comp.head_in.reshape(-1, comp.d_in), torch.block_diag(*comp.head_out.transpose(1, 2)) * s
    raise TypeError(type(comp).__name__)


def check_peft(adapted: AdaptedModel) -> str:
    """``lora`` or ``lokr``: the PEFT adapter type that holds the method exactly; else a one-line refusal."""
    name = _method_name(adapted)
    comps = [c for c in adapted.all_components() if not isinstance(c, VocabularyRows)]  # in the base
    if comps and all(isinstance(c, KronA) for c in comps):
        return _check_lokr(adapted, name)
    for comp in comps:
        if isinstance(comp, (LoRA, KernelWise, KernelWiseLite, KernelWiseOut)):
            continue
        raise KpeftError(f"cannot export {name} for PEFT: its {type(comp).__name__} component ({comp.site} site) is "
                         "not a low-rank or Kronecker weight update; use --format merged where it is mergeable")
    return "lora"


def _check_lokr(adapted: AdaptedModel, name: str) -> str:
    """PEFT LoKr holds ``W + w1 ⊗ w2`` with one ``decompose_factor`` f for every module: w1 is
    (f, f), so KronA's A must be square and of one size everywhere, on whole nn.Linear modules."""
    sizes = set()
    for proj in adapted.projections():
        comp = proj.branches[0]
        d_in, d_out, conv = _module_width(proj.base)
        if conv or len(proj.branches) > 1 or (comp.projection.start, comp.projection.stop) != (0, d_out):
            raise KpeftError(f"cannot export {name} as PEFT LoKr: PEFT's LoKr has no GPT-2 fused c_attn (Conv1D "
                             "column blocks); use --format merged")
        sizes.add(tuple(comp.A.shape))
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise KpeftError(f"cannot export {name} as PEFT LoKr: LoKr's w1 is (f, f) with one decompose_factor f for "
                         f"all modules, but KronA's A is {' / '.join(map(str, sorted(sizes)))}; use --format merged")
    return "lokr"


def _module_width(module: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    w = module.weight  # transformers' Conv1D: (d_in, d_out)
    return w.shape[0], w.shape[1], True


@torch.no_grad()
def peft_lora_weights(adapted: AdaptedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``{module name: (lora_A (R, d_in), lora_B (d_out, R), bias (d_out,) or None)}``: every branch
    of a projection stacked along the rank, its up-factor placed at its output column block."""
    out = {}
    for name, proj in adapted.model.named_modules():
        if not isinstance(proj, AdaptedProjection) or not proj.branches:
            continue
        d_in, d_out, _ = _module_width(proj.base)
        downs, ups, bias = [], [], None
        for comp in proj.branches:
            down, up = lora_factors(comp)
            if not torch.allclose((up @ down).t(), comp.delta_weight(), rtol=1e-4, atol=1e-6):
                raise KpeftError(f"internal: the LoRA factors of {type(comp).__name__} on {name} do not give its update")
            full = up.new_zeros(d_out, up.shape[1])
            full[comp.projection.start : comp.projection.stop] = up
            downs.append(down)
            ups.append(full)
            db = comp.delta_bias()
            if db is not None:
                bias = up.new_zeros(d_out) if bias is None else bias
                bias[comp.projection.start : comp.projection.stop] += db
        out[name] = (torch.cat(downs).contiguous(), torch.cat(ups, dim=1).contiguous(), bias)
    return out


def _task_type(model: nn.Module) -> str:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForConditionalGeneration") or cls.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def _head_modules(adapted: AdaptedModel) -> list[str]:
    ids = {id(p) for p in adapted.anatomy.task_head_params}
    return sorted({n.rsplit(".", 1)[0] for n, p in adapted.model.named_parameters() if id(p) in ids and p.requires_grad})


@torch.no_grad()
def export_peft(adapted: AdaptedModel, out: str | Path, tokenizer=None, base_model_name_or_path: str | None = None) -> Path:
    """A PEFT adapter in `out` equal to the method (LoRA; KronA as LoKr); the frozen base in
    ``out/base`` unless `base_model_name_or_path` names the hub checkpoint it came from."""
    from peft import get_peft_model

    kind = check_peft(adapted)
    out = Path(out)
    was_merged = adapted.merged
    adapted.unmerge()
    try:
        weights = peft_lora_weights(adapted) if kind == "lora" else lokr_weights(adapted)
        with plain_modules(adapted) as model:
            base = copy.deepcopy(model)
            if base_model_name_or_path is None:
                model.save_pretrained(out / "base")
                if tokenizer is not None:
                    tokenizer.save_pretrained(out / "base")
                base_model_name_or_path = str((out / "base").resolve())
    finally:
        if was_merged:
            adapted.merge()
    heads = _head_modules(adapted) or None
    config = (_lora_config if kind == "lora" else _lokr_config)(weights, base, heads)
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    for name, tensors in weights.items():
        layer = inner.get_submodule(name)
        if kind == "lokr":
            layer.lokr_w1["default"].copy_(tensors[0])
            layer.lokr_w2["default"].copy_(tensors[1])
            continue
        a, b, bias = tensors
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
        if config.lora_bias:
            layer.lora_B["default"].bias.copy_(torch.zeros_like(b[:, 0]) if bias is None else bias)
    with warnings.catch_warnings():  # PEFT mistakes the 1-D lora_B.bias for an unsharded FSDP tensor
        warnings.filterwarnings("ignore", message=".*invalid shape.*")
        peft_model.save_pretrained(out)
    path = out / "adapter_config.json"  # PEFT writes the in-memory model's name; the base is elsewhere
    written = json.loads(path.read_text())
    written["base_model_name_or_path"] = base_model_name_or_path
    path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _lora_config(weights, base: nn.Module, heads: list[str] | None):
    from peft import LoraConfig

    ranks = {name: a.shape[0] for name, (a, _, _) in weights.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    return LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(weights),
        fan_in_fan_out=any(_module_width(base.get_submodule(n))[2] for n in weights), lora_dropout=0.0,
        bias="none", lora_bias=any(b is not None for _, _, b in weights.values()), modules_to_save=heads,
        init_lora_weights=False, task_type=_task_type(base),
    )


@torch.no_grad()
def lokr_weights(adapted: AdaptedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (w1, w2)}`` with ``w1 ⊗ w2 = ΔW`` in nn.Linear orientation: KronA's row-convention
    ``s·(A ⊗ B)`` transposed is ``Aᵀ ⊗ s·Bᵀ``."""
    out = {}
    for name, proj in adapted.model.named_modules():
        if isinstance(proj, AdaptedProjection) and proj.branches:
            (comp,) = proj.branches
            out[name] = (comp.A.t().contiguous(), (comp.B.t() * comp.scaling).contiguous())
    return out


def _lokr_config(weights, base: nn.Module, heads: list[str] | None):
    from peft import LoKrConfig

    factor = next(iter(weights.values()))[0].shape[0]
    r = max(max(w2.shape) for _, w2 in weights.values())  # r ≥ max(w2) / 2: w2 is kept whole, not factored
    return LoKrConfig(r=r, alpha=r, decompose_factor=factor, decompose_both=False, target_modules=sorted(weights),
                      rank_dropout=0.0, module_dropout=0.0, init_weights=False, modules_to_save=heads,
                      task_type=_task_type(base))


# ---------------------------------------------------------------- the command
def hub_checkpoint(cfg) -> str | None:
    """The hub id a run's backbone came from, or None (random init, package, GGUF, local folder)."""
    m = cfg.model
    if m.init != "pretrained" or m.package or m.gguf_file or not m.name_or_path:
        return None
    return None if Path(str(m.name_or_path)).exists() else str(m.name_or_path)


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    from kpeft.api import embedding_rows, load_run

    if fmt not in FORMATS:
        raise KpeftError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    run = load_run(run_dir)
    out = Path(out)
    if fmt == "merged":
        export_merged(run.model, out, run.tokenizer)
    else:
        hub = None if embedding_rows(run.model) is not None else hub_checkpoint(run.config)
        export_peft(run.model, out, run.tokenizer, base_model_name_or_path=hub)
    note = {"format": fmt, "run_dir": str(Path(run_dir).resolve()), "method": run.config.method.name,
            "task": run.config.task.name, "model": run.config.model.name}
    if embedding_rows(run.model) is not None:
        note["task_embeddings"] = ("pass token_type_ids (the special-token id of each segment) as in "
                                   "kpeft's encoding; Llama: inputs_embeds = embed(input_ids) + embed(token_type_ids)")
    (out / "kpeft_export.json").write_text(json.dumps(note, indent=1) + "\n")
    return out


@user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kpeft.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run's directory (python -m kpeft.train)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="merged: plain transformers; peft: a PEFT LoRA")
    parser.add_argument("--out", required=True, help="the directory to write")
    args = parser.parse_args(argv)
    path = export_run(args.run_dir, args.format, args.out)
    print(f"kpeft: {args.format} export written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
