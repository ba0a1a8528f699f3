"""The Python API: adapt a transformers model, save and restore its adapter, load a finished run.

    model = kpeft.adapt(hf_model, method="kernel_mix_qvo", budget="intermediate", r=8)
    model.save_adapter("my_adapter")            # adapter.safetensors + kpeft_adapter.yaml
    model = kpeft.load_adapter(fresh_hf_model, "my_adapter")
    run = kpeft.load_run("results/runs/.../seed1")   # run.model, run.tokenizer, run.task, run.config

The method and budget are composed from the same YAML and typed schemas as the CLI
(:func:`kpeft.compose.compose`); ``docs/api.md`` has a runnable example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file, save_file
from torch import nn

from kpeft.backbones import describe
from kpeft.compose import available, check_method_fits_budget, compose
from kpeft.config import Config, MethodConfig
from kpeft.errors import KpeftError
from kpeft.methods import AdaptedModel, apply_method
from kpeft.methods.registry import SCHEMAS
from kpeft.methods.vocabulary import add_vocabulary_rows
from kpeft.records import output_mode

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "kpeft_adapter.yaml"


# ---------------------------------------------------------------- adapt
def method_config(method: str = "kernel_mix_qvo", budget: str = "intermediate", **overrides: Any) -> DictConfig:
    """The resolved, typed ``method`` config of ``method=<method> budget=<budget>`` plus overrides:
    a plain key (``r=8``) names a field of the method's only component holding it (or of the
    method itself), a dotted key (``components.lora.r=8``) a path inside the method config."""
    cfg = compose([f"method={method}", f"budget={budget}"])
    for key, value in overrides.items():
        path = _override_path(cfg.method, key)
        try:
            OmegaConf.update(cfg, path, value, merge=False)
        except OmegaConfBaseException as err:
            raise KpeftError(f"override {key}={value!r}: {str(err).splitlines()[0]}") from None
    check_method_fits_budget(cfg)
    OmegaConf.resolve(cfg)
    return cfg.method


def _override_path(method: DictConfig, key: str) -> str:
    """``method.<...>`` path of an override key, or a one-line error listing the valid keys."""
    key = key.removeprefix("method.")
    if "." in key:
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(method, node, throw_on_missing=False)
        if isinstance(parent, DictConfig) and leaf in parent:
            return f"method.{key}"
        raise KpeftError(f"method '{method.name}' has no key '{key}'; valid: {', '.join(_keys(method))}")
    found = [f"method.components.{c}.{key}" for c in method.components if key in method.components[c]]
    if key in method and key != "components":
        found.append(f"method.{key}")
    if len(found) == 1:
        return found[0]
    if found:
        raise KpeftError(f"override '{key}' is ambiguous in method '{method.name}': use one of "
                         f"{', '.join(p.removeprefix('method.') for p in found)}")
    raise KpeftError(f"method '{method.name}' has no key '{key}'; valid: {', '.join(_keys(method))}")


def _keys(method: DictConfig) -> list[str]:
    out = [k for k in method if k != "components"]
    for c, node in method.components.items():
        out += [str(k) if len(method.components) == 1 else f"components.{c}.{k}" for k in node if k != "kind"]
    return out


def adapt(model: nn.Module, method: str = "kernel_mix_qvo", budget: str = "intermediate", *,
          fidelity: str = "paper", **overrides: Any) -> AdaptedModel:
    """Install `method` (a ``conf/method`` name) sized by `budget` on a transformers `model`
    (GPT-2, BERT/RoBERTa, T5, Llama), in place. Returns the :class:`AdaptedModel`: call it like the
    model; ``merge()``, ``unmerge()``, ``trainable_parameters()``, ``count()``, ``save_adapter(dir)``."""
    if method not in available("method"):
        raise KpeftError(f"unknown method '{method}'; valid: {', '.join(available('method'))}")
    mcfg = method_config(method, budget, **overrides)
    try:
        anatomy = describe(model)
    except ValueError as err:
        raise KpeftError(str(err)) from None
    adapted = apply_method(model, anatomy, mcfg, fidelity)
    adapted.method_cfg, adapted.fidelity = mcfg, fidelity
    model.train(model.training)  # the new components follow the model's train/eval mode (dropout)
    return adapted


# ---------------------------------------------------------------- save / load an adapter
def save_adapter(adapted: AdaptedModel, directory: str | Path) -> Path:
    """``adapter.safetensors`` (the trained tensors only) and ``kpeft_adapter.yaml`` (the method
    config, fidelity, model type and any task-embedding rows) in `directory`."""
    method = getattr(adapted, "method_cfg", None)
    if method is None:
        raise KpeftError("this adapted model was not built by kpeft.adapt/load_run: its method config is unknown")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    was_merged = adapted.merged
    if was_merged:
        adapted.unmerge()
    try:
        save_file(adapted.adapter_state_dict(), str(directory / ADAPTER_FILE))
        output_mode(directory / ADAPTER_FILE)
    finally:
        if was_merged:
            adapted.merge()
    meta: dict[str, Any] = {
        "method": OmegaConf.to_container(method, resolve=True),
        "fidelity": getattr(adapted, "fidelity", "paper"),
        "model_type": adapted.model.config.model_type,
    }
    if adapted.vocabulary is not None:
        meta["embedding_rows"] = dict(adapted.vocabulary)
    OmegaConf.save(OmegaConf.create(meta), directory / META_FILE)
    return directory


def embedding_rows(adapted: AdaptedModel) -> tuple[int, int] | None:
    """(first new row, vocabulary size) when a task added tokens (the NLG task embeddings), else None."""
    rows = adapted.vocabulary
    return None if rows is None else (rows["rows_from"], rows["rows"])


def typed_method(data: dict) -> DictConfig:
    """A saved method config as the typed schema (each component as its kind's schema). A config
    saved when ``train_layernorm`` was a component key is read as the method's key."""
    components = {name: dict(comp) for name, comp in (data.get("components") or {}).items()}
    moved = [bool(comp.pop("train_layernorm")) for comp in components.values() if "train_layernorm" in comp]
    if moved and "train_layernorm" not in data:
        data = {**data, "train_layernorm": any(moved)}
    method = OmegaConf.merge(OmegaConf.structured(MethodConfig), {k: v for k, v in data.items() if k != "components"})
    for name, comp in components.items():
        schema = SCHEMAS.get(comp.get("kind"))
        node = OmegaConf.merge(OmegaConf.structured(schema), comp) if schema else OmegaConf.create(comp)
        method.components[name] = node
    return method


def load_adapter(model: nn.Module, directory: str | Path) -> AdaptedModel:
    """Install the method saved in `directory` (by :func:`save_adapter`) on a fresh transformers
    `model` of the same architecture and load its trained tensors."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file() or not (directory / ADAPTER_FILE).is_file():
        raise KpeftError(f"'{directory}' is not a kpeft adapter: it needs {META_FILE} and {ADAPTER_FILE} "
                         "(written by model.save_adapter(dir))")
    meta = OmegaConf.to_container(OmegaConf.load(directory / META_FILE))
    if meta.get("model_type") != model.config.model_type:
        raise KpeftError(f"the adapter in '{directory}' was trained on a {meta.get('model_type')} model, "
                         f"not {model.config.model_type}")
    method = typed_method(meta["method"])
    adapted = apply_method(model, describe(model), method, meta.get("fidelity", "paper"))
    adapted.method_cfg, adapted.fidelity = method, meta.get("fidelity", "paper")
    rows = meta.get("embedding_rows")
    if rows:
        add_vocabulary_rows(adapted, rows["rows_from"], rows["rows"], rows.get("token_types", True), adapted.fidelity)
    try:
        adapted.load_adapter_state_dict(load_file(str(directory / ADAPTER_FILE)))
    except (KeyError, RuntimeError) as err:
        raise KpeftError(f"the adapter in '{directory}' does not fit this model ({str(err).splitlines()[0]})") from None
    model.train(model.training)
    return adapted


# ---------------------------------------------------------------- a finished run
class Run(NamedTuple):
    """A run loaded by :func:`load_run`."""

    model: AdaptedModel  # best checkpoint loaded, eval mode
    tokenizer: Any  # None for tokenizer-free tasks
    task: Any  # the run's task encoder (kpeft.tasks)
    config: DictConfig  # the run's resolved root config


def run_config(run_dir: str | Path) -> DictConfig:
    """The resolved root config a run trained with (typed)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "checkpoints" / "best" / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            saved = OmegaConf.load(path)
            break
    else:
        raise KpeftError(f"'{run_dir}' is not a kpeft run directory (no checkpoints/best/config.yaml); "
                         "pass the run_dir of a finished `python -m kpeft.train` run")
    method = typed_method(OmegaConf.to_container(saved.method))
    rest = {k: v for k, v in OmegaConf.to_container(saved).items() if k != "method"}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), rest)
    cfg.method = method
    return cfg


def load_run(run_dir: str | Path, checkpoint: str = "best") -> Run:
    """The adapted model (checkpoint `checkpoint`: best, or last), tokenizer and task encoder of
    a run written by ``python -m kpeft.train``."""
    from kpeft.train import build_model
    from kpeft.training.checkpoint import load_adapter as load_checkpoint

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    ckpt = run_dir / "checkpoints" / checkpoint
    if not (ckpt / ADAPTER_FILE).is_file():
        raise KpeftError(f"run '{run_dir}' has no {checkpoint} checkpoint ({ckpt / ADAPTER_FILE}); valid: best, last")
    torch.manual_seed(cfg.seed)
    adapted, task = build_model(cfg)
    load_checkpoint(ckpt, adapted)
    adapted.method_cfg, adapted.fidelity = cfg.method, cfg.fidelity
    adapted.model.eval()
    return Run(adapted, task.tokenizer, task, cfg)
