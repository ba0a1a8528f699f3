"""`make params-table`: the papers' printed parameter rows next to our counts."""

from __future__ import annotations

import json

import pytest

from kpeft.compose import available
from kpeft.count import main as count_main
from kpeft.params_table import PaperRow, agrees, count_row, load_rows, markdown, summary


def test_agreement_is_rounding_to_the_printed_digits():
    assert agrees("0.13", 0.1333) and not agrees("0.13", 0.1185)  # Kernel-mix-lite(qv) small as printed
    assert agrees("0.07*", 0.0710)  # KronA^B's footnote mark is ignored
    assert agrees("0.5", 0.488) and agrees("100", 100.0) and agrees("7.98", 7.9816)
    assert not agrees("0.08", 0.0852)  # Compacter with a LayerNorm per adapter
    assert not agrees("1.61", None)


def test_every_row_names_real_configs():
    rows = load_rows()
    assert len(rows) >= 40 and {r.paper for r in rows} == {"KM", "IT", "KA"}
    for r in rows:
        assert r.model in available("model") and r.method in available("method"), r
        assert r.budget in available("budget"), r


ROWS = [  # (row, trainable, stored) — the papers' printed counts, [KM] Table 1 and [IT] Table 1
    (PaperRow("KM", "1", "LoRA-4", "gpt2", "lora", "small", "0.13"), 165_888, 165_888),
    (PaperRow("KM", "1", "Prefix-108", "gpt2", "prefix", "intermediate", "7.98", "1.60"), 9_932_288, 1_990_656),
    (PaperRow("KM", "1", "Kernel-mix-lite(qv)", "gpt2", "kernel_mix_lite_qv", "small", "0.13"), 147_456, 147_456),
    (PaperRow("KM", "1", "Kernel-mix-lite(qv) V 2L", "gpt2", "kernel_mix_lite_qv", "small", "0.13",
              overrides=["budget.kernel_mix_lite_qv.v_wise=2"]), 165_888, 165_888),
]


def test_rows_carry_our_counts_and_marks(capsys):
    counted = [count_row(r) for r, *_ in ROWS]
    for c, (row, trainable, stored) in zip(counted, ROWS):
        assert (c.trainable, c.stored) == (trainable, stored), row.label
        # the same numbers as `python -m kpeft.count` prints
        capsys.readouterr()
        count_main(row.overrides_all())
        cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (cli["trainable"], cli["stored"]) == (c.trainable, c.stored)
    assert [c.matches for c in counted] == [True, True, False, True]
    md = markdown(counted)
    assert ("| KM | 1 | Prefix-108 | `gpt2 prefix intermediate` | 7.98 | 7.98 (9,932,288) | 1.60 "
            "| 1.60 (1,990,656) | ✓ |") in md
    assert "| 0.13 | 0.12 (147,456) | 0.13 | 0.12 (147,456) | ✗ |" in md
    assert summary(counted) == {"rows": 4, "match": 3, "differ": 1, "errors": 0}


def test_a_config_that_fails_is_reported_not_raised():
    c = count_row(PaperRow("KA", "1", "x", "t5_base", "lora", "foo_budget_absent", "0.07"))
    assert c.error and c.matches is None


@pytest.mark.slow
def test_make_params_table(tmp_path):
    """The whole `make params-table`: every row counted, the file written."""
    from kpeft.params_table import main

    out = main(["--out", str(tmp_path / "params.md")])
    assert out["rows"] == len(load_rows()) and out["errors"] == 0
    assert out["match"] + out["differ"] == out["rows"]
    text = (tmp_path / "params.md").read_text()
    assert text.count("| ✗ |") == out["differ"]
