"""budget=match: sizes solved on the backbone for a target count (kpeft/budget_match.py).

The solved sizes are checked against the hand-matched SmolLM2 budget (conf/budget/smollm2.yaml,
whose counts were found by hand with kpeft.count) and against a brute-force search."""

from __future__ import annotations

import re

import pytest

from kpeft.compose import compose
from kpeft.count import count_parameters
from kpeft.errors import KpeftError

SMOL = ("model=smollm2_135m", "budget=match")


@pytest.mark.parametrize(("method", "target", "sizes", "stored"), [
    ("lora", "460800", {"r": 8}, 460_800),
    ("adapter", "0.34%", {"bottleneck": 12}, 466_920),
    ("prefix", "460800", {"length": 40}, 460_800),
    ("inducer_lora", "460800", {"r_k": 1, "r_v": 2, "lora_r": 3}, 467_100),
    ("kernel_wise_lite_qv", "460800", {"q_wise": 10, "v_wise": 10}, 460_800),
])
def test_solved_sizes_equal_the_hand_matched_smollm2_budget(method, target, sizes, stored):
    cfg = compose([*SMOL, f"method={method}", f"budget.target={target}"])
    assert {k: cfg.budget[method][k] for k in sizes} == sizes
    assert cfg.budget.achieved == stored == count_parameters(cfg).stored
    hand = compose(["model=smollm2_135m", "budget=smollm2", f"method={method}"])
    assert {k: hand.budget[method][k] for k in sizes} == sizes  # what conf/budget/smollm2.yaml chose by hand


def test_the_method_reads_the_solved_sizes():
    cfg = compose([*SMOL, "method=lora", "budget.target=460800"])
    assert cfg.method.components.lora.r == 8


def test_one_size_methods_get_the_closest_count_of_all():
    """Brute force over LoRA's rank on tiny_gpt2: the solver's rank is the argmin of |count − target|."""
    target = 1_000
    counts = {r: count_parameters(compose(["model=tiny_gpt2", "method=lora", "budget=tiny",
                                           f"budget.lora.r={r}"])).stored for r in range(1, 17)}
    best = min(counts, key=lambda r: (abs(counts[r] - target), r))
    cfg = compose(["model=tiny_gpt2", "method=lora", "budget=match", f"budget.target={target}"])
    assert cfg.budget.lora.r == best and cfg.budget.achieved == counts[best]


def test_targets_are_part_of_the_run_identity(tmp_path):
    a = compose([*SMOL, "method=lora", "budget.target=460800", f"output_root={tmp_path}"])
    b = compose([*SMOL, "method=lora", "budget.target=0.5%", f"output_root={tmp_path}"])
    assert a.run_dir != b.run_dir and a.budget.lora.r == 8 and b.budget.lora.r > 8


@pytest.mark.parametrize(("overrides", "message"), [
    (("method=lora",), "budget=match needs a target: add budget.target=<count>"),
    (("method=lora", "budget.target=abc"), "budget.target='abc' is not a positive count or percentage"),
    (("method=lora", "budget.target=-3"), "is not a positive count or percentage"),
])
def test_wrong_targets_are_one_line_errors(overrides, message):
    with pytest.raises(KpeftError, match=re.escape(message)):
        compose([*SMOL, *overrides])


def test_size_free_methods_keep_their_count():
    cfg = compose([*SMOL, "method=finetune", "budget.target=460800"])
    assert cfg.budget.achieved is None and count_parameters(cfg).trainable == 134_515_008
