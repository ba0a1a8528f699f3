"""Paper tables from records: aggregation, significance, rendering, figures (synthetic records
with known values; the tests compare against hand computations and independent formulas)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from kpeft.experiments.build import build
from kpeft.experiments.collect import collect, honours, load_runs
from kpeft.experiments.render import latex, markdown
from kpeft.experiments.spec import Column, Group, Row, TableSpec, TaskColumns, cells, infer_spec
from kpeft.experiments.stats import best_index, paired_bootstrap_p, summarize, welch_p
from kpeft.paths import REPO_ROOT
from kpeft.records import write_record


# ---------------------------------------------------------------- statistics
def test_summary_is_mean_and_sample_std():
    s = summarize([60.0, 62.0, 64.0])
    assert (s.n, s.mean, s.std) == (3, 62.0, 2.0)  # std = sqrt(((-2)² + 0 + 2²) / 2)
    assert summarize([5.0]).std == 0.0
    assert summarize([]) is None and summarize([float("nan")]) is None


def welch_by_hand(a, b):
    """Welch's t and the Welch–Satterthwaite degrees of freedom, written out."""
    na, nb = len(a), len(b)
    va, vb = np.var(a, ddof=1) / na, np.var(b, ddof=1) / nb
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return t, df, 2 * sps.t.sf(abs(t), df)


def test_welch_matches_the_formula():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    t, df, p = welch_by_hand(a, b)
    assert t == pytest.approx(-3 / math.sqrt(2.5 / 5 + 10 / 5))
    assert df == pytest.approx(6.25 / (0.25 / 4 + 4 / 4))  # 5.882…
    assert welch_p(a, b) == pytest.approx(p, rel=1e-10)
    assert 0.1 < p < 0.11
    # Clearly different seeds → significant; one value per side or no variance → untestable.
    assert welch_p([80.1, 80.3, 80.2], [70.0, 70.4, 70.2]) < 1e-4
    assert welch_p([1.0], [2.0, 3.0]) is None
    assert welch_p([1.0, 1.0], [1.0, 1.0]) is None


def test_paired_bootstrap():
    # Every example better by the same amount: no resample reaches 0 → the smallest p.
    assert paired_bootstrap_p([1.0] * 50, [0.0] * 50, n_boot=999) == pytest.approx(2 / 1000)
    assert paired_bootstrap_p([0.3] * 20, [0.3] * 20) == 1.0
    assert paired_bootstrap_p([1.0], [0.0]) is None
    # Gaussian differences: the bootstrap p is close to the normal-theory two-sided p.
    rng = np.random.default_rng(0)
    d = rng.normal(0.05, 1.0, 2000)
    normal_p = 2 * sps.norm.sf(abs(d.mean()) / (d.std(ddof=1) / math.sqrt(d.size)))
    assert paired_bootstrap_p(d, np.zeros_like(d), n_boot=4000) == pytest.approx(normal_p, abs=0.03)


def test_best_index_respects_direction_and_ties():
    assert best_index([1.0, 3.0, None, 3.0]) == [1, 3]
    assert best_index([1.0, 3.0, None], lower_is_better=True) == [0]
    assert best_index([None]) == []


# ---------------------------------------------------------------- tables from records
TABLE = TableSpec(
    title="Synthetic", source="test", split="test",
    tasks=[TaskColumns("taskA", "Task A", [1, 2, 3],
                       [Column("acc", "Acc", example_score="score"), Column("ter", "TER", lower_is_better=True)])],
    groups=[Group("full", "big", [Row("finetune", "FT")]),
            Group("small", "small", [Row("bitfit", "BitFit"), Row("lora", "LoRA"),
                                      Row("ours", "Ours", baseline=False, overrides=["budget.ours.r=2"])])],
)
# method → per-seed (acc, ter); per-example scores for the bootstrap.
VALUES = {
    "finetune": [(90.0, 0.30), (91.0, 0.31), (92.0, 0.29)],
    "bitfit": [(70.0, 0.50), (71.0, 0.52)],  # seed 3 missing
    "lora": [(80.0, 0.40), (80.4, 0.41), (80.2, 0.42)],
    "ours": [(85.0, 0.35), (85.2, 0.33), (85.1, 0.34)],
}


def fake_record(root: Path, method: str, seed: int, acc: float, ter: float, *, status="complete",
                budget=None, config=None, examples=None) -> Path:
    budget = budget or ("big" if method == "finetune" else "small")
    run_dir = root / "taskA" / "m" / f"{method}-{budget}" / f"seed{seed}"
    rec = {"status": status, "task": "taskA", "model": "m", "method": method, "budget": budget, "seed": seed,
           "run_dir": str(run_dir), "metrics": {"test": {"acc": acc, "ter": ter}},
           "params": {"trainable_pct": 100.0 if method == "finetune" else 0.1234, "stored_pct": 0.1234},
           "config": config or {"budget": {"ours": {"r": 2}}}}
    if status == "failed":
        rec = {k: rec[k] for k in ("status", "task", "model", "method", "budget", "seed", "run_dir")}
        rec["error"] = "RuntimeError: CUDA out of memory"
    write_record(run_dir, rec)
    if examples is not None:
        (run_dir / "predictions").mkdir()
        with open(run_dir / "predictions" / "test.jsonl", "w") as fh:
            for i, s in enumerate(examples):
                fh.write(json.dumps({"index": i, "prediction": 0, "label": 0, "score": s}) + "\n")
    return run_dir


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(1)
    for method, values in VALUES.items():
        for seed, (acc, ter) in enumerate(values, start=1):
            # per-example 0/1 scores: ours right on 85% of 400 examples, LoRA on 80% of the same ones
            p = {"ours": 0.85, "lora": 0.80}.get(method)
            ex = (rng.random(400) < p).astype(float) if p else None
            fake_record(tmp_path, method, seed, acc, ter, examples=ex)
    fake_record(tmp_path, "bitfit", 3, 0, 0, status="failed")
    return tmp_path


def test_table_values_bold_missing_and_significance(records):
    view = build(TABLE, "m", collect(TABLE, "m", load_runs(records)))
    rows = {r.label: r for r in view.rows}
    acc, ter = 0, 1
    ft = rows["FT"].cells[acc].summary
    assert (ft.n, ft.mean, ft.std) == (3, 91.0, 1.0)
    assert rows["BitFit"].cells[acc].summary.n == 2 and rows["BitFit"].cells[acc].failed == 1
    assert rows["Ours"].cells[acc].summary.mean == pytest.approx(85.1)
    # Bold: the best of each group (TER: the lowest).
    assert rows["FT"].cells[acc].bold and rows["Ours"].cells[acc].bold and not rows["LoRA"].cells[acc].bold
    assert rows["Ours"].cells[ter].bold and not rows["BitFit"].cells[ter].bold
    # Best baseline of "small" = LoRA (80.2 > 70.5); Ours vs LoRA by Welch and by bootstrap.
    assert rows["LoRA"].cells[acc].reference and rows["LoRA"].cells[acc].welch_p is None
    expected = welch_by_hand([85.0, 85.2, 85.1], [80.0, 80.4, 80.2])[2]
    assert rows["Ours"].cells[acc].welch_p == pytest.approx(expected, rel=1e-9)
    assert rows["Ours"].cells[acc].marks == "*†"
    assert rows["Ours"].cells[acc].bootstrap_p < 0.05
    assert rows["BitFit"].cells[acc].bootstrap_p is None  # no per-example file
    assert rows["Ours"].cells[ter].bootstrap_p is None  # TER has no per-example score
    # TER: the best baseline is LoRA (0.41 < 0.51); Ours 0.34 ± 0.01 differs.
    assert rows["Ours"].cells[ter].welch_p < 0.05
    assert rows["Ours"].train_pct == pytest.approx(0.1234) and rows["FT"].train_pct == 100.0
    assert view.missing == ["taskA bitfit-small seed 3"]
    assert view.failed == ["taskA bitfit-small seed 3: RuntimeError: CUDA out of memory"]


def test_markdown_and_latex(records):
    view = build(TABLE, "m", collect(TABLE, "m", load_runs(records)))
    md = markdown(view)
    assert "| Budget | Method | Train % | Store % | Task A Acc | Task A TER |" in md
    assert "| full | FT | 100 | 0.12 | **91.00 ± 1.00** | **0.30 ± 0.01** |" in md
    # BitFit differs significantly from LoRA too (two-sided tests: the marks say "differs").
    assert "| small | BitFit | 0.12 | 0.12 | 70.50 ± 0.71\\* (2/3, 1 failed) |" in md
    assert "**85.10 ± 0.10**\\*†" in md
    assert "Runs: 11 of 12 have a complete record; 1 failed." in md
    tex = latex(view)
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){5-6}", r"\multicolumn{2}{c}{Task A}",
                  r"\textbf{85.10}$\pm$0.10$^{*\dagger}$", r"70.50$\pm$0.71$^{*}$ {\scriptsize (2/3, 1 failed)}"):
        assert piece in tex, piece


def test_missing_rows_show_a_dash_never_a_number(tmp_path):
    fake_record(tmp_path, "finetune", 1, 90.0, 0.3)
    view = build(TABLE, "m", collect(TABLE, "m", load_runs(tmp_path)))
    md = markdown(view)
    assert "| small | BitFit | — | — | — (0/3) | — (0/3) |" in md
    assert "| full | FT | 100 | 0.12 | **90.00** (1/3) |" in md
    assert len(view.missing) == 11


def test_records_without_the_row_overrides_are_not_counted(tmp_path):
    fake_record(tmp_path, "ours", 1, 85.0, 0.3, config={"budget": {"ours": {"r": 1}}})
    fake_record(tmp_path, "ours", 2, 85.0, 0.3)
    view = build(TABLE, "m", collect(TABLE, "m", load_runs(tmp_path)))
    assert next(r for r in view.rows if r.label == "Ours").cells[0].summary.n == 1
    assert view.ignored == 1
    assert honours({"config": {"a": {"b": [1, 2]}}}, ["a.b=[1,2]"])
    assert not honours({"config": {}}, ["a.b=1"])


def test_cells_are_seed_major_and_per_task_seeds():
    spec = TableSpec(tasks=[TaskColumns("t1", seeds=[1, 2, 3]), TaskColumns("t2", seeds=[1])],
                     groups=[Group("g", "small", [Row("a"), Row("b", budget="big")])])
    got = [(c.seed, c.task, c.method, c.budget) for c in cells(spec)]
    assert got == [(1, "t1", "a", "small"), (1, "t1", "b", "big"), (1, "t2", "a", "small"), (1, "t2", "b", "big"),
                   (2, "t1", "a", "small"), (2, "t1", "b", "big"), (3, "t1", "a", "small"), (3, "t1", "b", "big")]


def test_inferred_spec_follows_method_train_order():
    found = [("sst2", "lora", "nlu", 1), ("sst2", "bitfit", "nlu", 2), ("sst2", "extra", "nlu", 1)]
    spec = infer_spec("x", "nlu", ["sst2"], found, ["finetune", "bitfit", "lora"])
    assert [r.method for r in spec.groups[0].rows] == ["finetune", "bitfit", "lora", "extra"]
    assert spec.tasks[0].seeds == [1, 2]


def test_cli_writes_markdown_latex_and_figure(tmp_path, capsys):
    from kpeft.tables import main

    root = tmp_path / "runs"
    for method, values in (("finetune", [10.0, 12.0]), ("bitfit", [5.0, 6.0]), ("lora", [8.0, 9.0])):
        for seed, v in enumerate(values, start=1):
            run_dir = root / "table_smoke" / "demo_reverse" / "tiny_gpt2" / f"{method}-small" / f"seed{seed}"
            write_record(run_dir, {"status": "complete", "task": "demo_reverse", "model": "tiny_gpt2",
                                   "method": method, "budget": "small", "seed": seed,
                                   "metrics": {"test": {"accuracy": v}},
                                   "params": {"trainable_pct": {"finetune": 100, "bitfit": 1.9}.get(method, 3.0),
                                              "stored_pct": 1.0}})
    out = main(["experiment=table_smoke", f"output_root={root}", "--out", str(tmp_path / "tables")])
    assert out["runs"] == out["complete"] == 6 and out["missing"] == 0
    md = Path(out["markdown"]).read_text()
    assert "| full | Fine-tune | 100 | 1.00 | **11.00 ± 1.41** |" in md
    assert Path(out["latex"]).read_text().startswith("% Generated by python -m kpeft.tables")
    assert Path(out["figure"]).stat().st_size > 1000
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_nlu_mini_records_give_its_nine_methods(tmp_path):
    """The committed nlu_mini records rebuild the committed table (27 runs, every row and the footer)."""
    root = REPO_ROOT / "results" / "runs" / "nlu_mini"
    if not any(root.glob("**/record.json")):
        pytest.skip("no nlu_mini records yet (make nlu-mini RUN=1)")
    from kpeft.experiments.preset import compose_preset, table_spec
    from kpeft.tables import main

    spec = table_spec(compose_preset(["experiment=nlu_mini", f"output_root={REPO_ROOT / 'results' / 'runs'}"]))
    assert [r.method for g in spec.groups for r in g.rows] == [
        "finetune", "bitfit", "prefix", "adapter", "lora", "mam_adapter", "krona", "kernel_mix_qvo", "inducer_lora"]
    assert {g.budget for g in spec.groups} == {"nlu"}
    out = main(["experiment=nlu_mini", f"output_root={REPO_ROOT / 'results' / 'runs'}",
                "--out", str(tmp_path), "--no-figure"])
    assert (out["runs"], out["complete"], out["missing"], out["failed"]) == (27, 27, 0, 0)
    md = Path(out["markdown"]).read_text()
    assert md == (REPO_ROOT / "results" / "tables" / "nlu_mini.md").read_text()
    assert "| Fine-tune | 100 | 100 | **80.20 ± 0.33** |" in md


def test_krona_table2_reads_the_newest_bench_result(tmp_path):
    from kpeft.tables import main

    bench = tmp_path / "bench"
    bench.mkdir()
    result = {"table2": {"finetune": {"latency": 100.0, "training_time": 100.0},
                         "krona": {"latency": 101.4, "training_time": 76.2}},
              "setup": {"model": "gpt2", "device_name": "cpu"}}
    (bench / "cpu-1t.json").write_text(json.dumps(result))
    out = main(["experiment=krona_table2", f"hydra.sweeper.table.bench_file={bench}/*.json",
                "--out", str(tmp_path / "tables")])
    md = Path(out["markdown"]).read_text()
    assert "| KronA | 101 | 100 | 76 | 75 |" in md  # ours next to [KA] Table 2's printed values
    assert "| KronA^B | — | 127 | — | 74 |" in md
    assert (out["complete"], out["missing"]) == (2, 6)
