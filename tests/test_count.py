"""``python -m kpeft.count``: the papers' parameter columns, exactly ([KM] Table 1, [IT] Table 1; docs/deviations.md), offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kpeft.compose import available
from kpeft.config import CONF_DIR
from kpeft.count import main

JSON_KEYS = {"model", "method", "budget", "total", "trainable", "stored", "trainable_pct", "stored_pct"}


@pytest.mark.parametrize(
    ("args", "total", "trainable", "line"),
    [
        # [KM] Table 1, [IT] Table 1: LoRA-4 = 0.13%, LoRA-54 = 1.61% (with the trained bias β), BitFit 0.08%.
        (["model=gpt2", "method=lora", "budget=small"], 124_439_808, 165_888, "trainable 165,888 (0.13%)"),
        (["model=gpt2", "method=lora", "budget=intermediate"], 124_439_808, 2_009_088, "trainable 2,009,088 (1.61%)"),
        (["model=gpt2", "method=lora", "budget=tiny"], 124_439_808, 92_160, "trainable 92,160 (0.07%)"),
        (["model=gpt2", "method=bitfit"], 124_439_808, 102_144, "trainable 102,144 (0.08%)"),
        (["model=gpt2", "method=finetune"], 124_439_808, 124_439_808, "trainable 124,439,808 (100.00%)"),
        # He et al.'s GLUE budget on RoBERTa-base (pooler counted, classifier not): r=16 + β.
        (["model=roberta_base", "method=lora", "budget=nlu"], 124_645_632, 608_256, "trainable 608,256 (0.49%)"),
    ],
)
def test_count_reproduces_the_papers_numbers(args, total, trainable, line, capsys):
    record = main(args)
    assert record["total"] == total
    assert record["trainable"] == record["stored"] == trainable
    assert record["trainable_pct"] == round(100 * trainable / total, 4)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == " ".join(args[:2]) + f" budget={record['budget']}"
    assert out[1] == f"total {total:,}"
    assert line in out
    assert json.loads(out[-1]) == record


def test_the_last_line_is_the_json_record(capsys):
    record = main(["model=gpt2", "method=lora", "budget=small"])
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(last) == JSON_KEYS
    assert last == {
        "model": "gpt2",
        "method": "lora",
        "budget": "small",
        "total": 124_439_808,
        "trainable": 165_888,
        "stored": 165_888,
        "trainable_pct": 0.1333,
        "stored_pct": 0.1333,
    }
    assert last == record


def test_t5_glue_budget(capsys):
    # T5-base has no biases, so no β. t5_glue is our reconstruction (docs/deviations.md) of KronA's 0.07%: all
    # 36 attention modules (cross-attention too), 72 × 1,536, + T5's 62 LayerNorms (62 × 768).
    default = main(["model=t5_base", "method=lora", "budget=t5_glue"])
    assert (default["total"], default["trainable"]) == (222_903_552, 72 * 1_536 + 62 * 768)
    assert default["trainable"] == 158_208 and default["trainable_pct"] == 0.071
    no_ln = main(["model=t5_base", "method=lora", "budget=t5_glue", "budget.lora.train_layernorm=false"])
    assert no_ln["trainable"] == 110_592 and no_ln["trainable_pct"] == 0.0496
    assert "trainable 110,592 (0.05%)" in capsys.readouterr().out.splitlines()
    self_only = main(["model=t5_base", "method=lora", "budget=t5_glue", "budget.lora.attention=self",
                      "budget.lora.train_layernorm=false"])
    assert self_only["trainable"] == 24 * 2 * 1_536
    capsys.readouterr()


def test_other_backbones_totals(capsys):
    # Architecture numbers only (meta device): the published totals.
    assert main(["model=t5_base", "method=finetune"])["total"] == 222_903_552
    assert main(["model=gpt2_medium", "method=finetune"])["total"] == 354_823_168
    smol = main(["model=smollm2_135m", "method=lora", "budget=small"])
    # 30 layers × (q 576×4 + 4×576, v 576×4 + 4×192), no β on the bias-free Llama projections.
    assert smol["trainable"] == 30 * ((576 * 4 + 4 * 576) + (576 * 4 + 4 * 192))
    capsys.readouterr()


def test_bitfit_on_a_bias_free_backbone_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["model=t5_base", "method=bitfit", "method.components.bitfit.add_missing_biases=false"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kpeft: error: method 'bitfit' found nothing to train on backbone 't5'")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("KPEFT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "kpeft.count", *args],
        capture_output=True, text=True, env=env, cwd=CONF_DIR.parent, timeout=120,
    )


def test_the_cli_end_to_end():
    ok = _cli("model=gpt2", "method=lora", "budget=small")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert "trainable 165,888 (0.13%)" in lines
    assert json.loads(lines[-1])["trainable"] == 165_888

    bad = _cli("model=gpt2", "method=nope")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"kpeft: error: unknown method 'nope'; valid: {', '.join(available('method'))}"
    ]
    assert "Traceback" not in bad.stderr
