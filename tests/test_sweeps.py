"""Table sweeps: the presets' runs, filters, skipping finished runs, failed runs recorded without
stopping the sweep, and an interrupted sweep resumed (real Hydra multiruns of tiny trainings)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kpeft.compose import available, budgets_sizing, compose
from kpeft.config import CONF_DIR
from kpeft.errors import KpeftError
from kpeft.experiments.preset import compose_preset, declared_spec
from kpeft.experiments.spec import cells
from kpeft.experiments.sweep import plan, select, split_arguments
from kpeft.records import read_record, write_record

TABLE_PRESETS = [p for p in available("experiment")
                 if "override /hydra/sweeper: kpeft" in (CONF_DIR / "experiment" / f"{p}.yaml").read_text()]


# ---------------------------------------------------------------- presets and planning
def budget_sections(method: str) -> set[str]:
    """The budget sections a method YAML reads its sizes from (``${budget.<section>.…}``)."""
    return set(re.findall(r"\$\{budget\.(\w+)\.", (CONF_DIR / "method" / f"{method}.yaml").read_text()))


def test_table_presets_exist():
    assert {"km_table1", "km_table2", "km_table3", "it_table1", "it_table2", "it_table3", "krona_table1",
            "krona_table2", "lora_e2e", "prefix_table", "table_smoke"} <= set(TABLE_PRESETS)


@pytest.mark.parametrize("preset", TABLE_PRESETS)
def test_every_row_of_a_preset_has_a_budget_that_sizes_it(preset):
    cfg = compose_preset([f"experiment={preset}"])
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.kpeft_sweeper.KpeftSweeper"
    spec = declared_spec(cfg)
    if spec.kind == "bench":
        return
    assert cfg.resume is True, "table presets resume interrupted runs"
    for method, budget in {(c.method, c.budget) for c in cells(spec)}:
        for section in budget_sections(method):
            assert budget in budgets_sizing(section), (method, budget)
    assert all((CONF_DIR / "task" / f"{t.task}.yaml").exists() for t in spec.tasks)


@pytest.mark.slow
@pytest.mark.parametrize("preset", TABLE_PRESETS)
def test_every_row_of_a_preset_composes(preset):
    """Each row composes on the preset's model, with the row's overrides (slow: ~1 s a row)."""
    spec = declared_spec(compose_preset([f"experiment={preset}"]))
    if spec.kind == "bench":
        return
    first = {}
    for cell in cells(spec):
        first.setdefault((cell.method, cell.budget, cell.overrides), cell)
    for cell in first.values():
        run = compose([f"experiment={preset}", *cell.as_overrides()])
        path = f"{cell.task}/{run.model.name}/{cell.method}-{cell.budget}/seed{cell.seed}{run.run_id}"
        assert run.run_dir.endswith(path) and (run.run_id == "" or cell.overrides)  # a plain row: a plain path


def test_paper_presets_have_the_papers_seeds():
    seeds = {t.task: len(t.seeds) for t in declared_spec(compose_preset(["experiment=km_table1"])).tasks}
    assert seeds == {"webnlg": 5, "coqa": 3, "cnndm": 2}  # [KM] B.2
    spec = declared_spec(compose_preset(["experiment=km_table1"]))
    assert len(cells(spec)) == 13 * (5 + 3 + 2)


def test_method_train_by_task():
    cfg = compose(["experiment=it_table1", "method=inducer_lora", "task=coqa"])
    assert (cfg.train.lr, cfg.train.batch_size) == (1.0e-3, 16)  # [IT] B.2, CoQA
    cfg = compose(["experiment=it_table1", "method=inducer_lora", "task=webnlg"])
    assert (cfg.train.lr, cfg.train.batch_size) == (1.25e-3, 16)
    cfg = compose(["experiment=km_table1", "method=finetune", "task=coqa"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.label_smoothing) == (6.25e-5, 8, 0.0)


def test_filters_and_overrides():
    spec = declared_spec(compose_preset(["experiment=km_table1"]))
    filters, rest = split_arguments(["experiment=km_table1", "task=webnlg", "seed=1,2", "train.epochs=1"])
    assert filters == {"task": {"webnlg"}, "seed": {"1", "2"}} and rest == ["experiment=km_table1", "train.epochs=1"]
    chosen = select(spec, filters)
    assert len(chosen) == 13 * 2 and {c.task for c in chosen} == {"webnlg"}
    assert [c.seed for c in chosen[:13]] == [1] * 13  # seed-major: every row's seed 1 first
    with pytest.raises(KpeftError, match="sweep only task, method, budget, seed"):
        split_arguments(["train.lr=1e-3,1e-4"])


def test_plan_skips_complete_records_unless_forced(tmp_path):
    spec = declared_spec(compose_preset(["experiment=table_smoke"]))

    def fake_compose(overrides):
        o = dict(x.split("=", 1) for x in overrides)
        return OmegaConf.create({"run_dir": str(tmp_path / o["method"] / o["seed"]), "force": o.get("force") == "true"})

    write_record(tmp_path / "lora" / "1", {"status": "complete"})
    write_record(tmp_path / "bitfit" / "1", {"status": "failed"})
    jobs = plan(spec, ["experiment=table_smoke"], fake_compose)
    assert [(j.cell.method, j.cell.seed) for j in jobs if j.done] == [("lora", 1)]
    assert len(jobs) == 6
    assert not any(j.done for j in plan(spec, ["experiment=table_smoke", "force=true"], fake_compose))


def test_joblib_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install 'kpeft[cluster]'")
    cfg = compose_preset(["experiment=km_table1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 4
    assert cfg.hydra.sweeper._target_.endswith("KpeftSweeper")


# ---------------------------------------------------------------- real sweeps
# 32 training examples, batch 8, 2 epochs = 8 steps, a checkpoint every 2 steps.
TINY = ["task.options.n_train=32", "task.options.n_val=8", "task.options.n_test=16", "train.batch_size=8",
        "train.checkpoint_every_steps=2", "train.eval_batch_size=16"]


def sweep(monkeypatch, root: Path, *args: str) -> int:
    """``python -m kpeft.train -m experiment=table_smoke …`` in this process; its exit code."""
    from kpeft.train import main

    monkeypatch.setattr(sys, "argv", ["kpeft.train", "-m", "experiment=table_smoke", f"output_root={root}",
                                      "method=finetune,lora", *TINY, *args])
    try:
        main()
        return 0
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        GlobalHydra.instance().clear()


def seed_dir(runs: Path, method: str, seed: int) -> Path:
    """The run directory of a TINY run: TINY's smaller data is a config of its own (docs/runs.md),
    ``seed<S>-<hash>``; train.crash_after_steps does not change it."""
    (found,) = (runs / f"{method}-small").glob(f"seed{seed}-*")
    return found


def test_interrupted_sweep_resumes_without_redoing_finished_runs(monkeypatch, tmp_path):
    root = tmp_path / "runs"
    runs = root / "table_smoke" / "demo_reverse" / "tiny_gpt2"
    # 1. seed 1 of both methods finishes.
    assert sweep(monkeypatch, root, "seed=1") == 0
    finished = {m: (seed_dir(runs, m, 1) / "record.json").read_text() for m in ("finetune", "lora")}
    # 2. the whole sweep, "killed" after 3 steps of every run it starts: seed 1 is not re-run, the
    #    seed-2 runs fail one after the other (the sweep goes on) with failed records.
    assert sweep(monkeypatch, root, "train.crash_after_steps=3") == 1
    for m in ("finetune", "lora"):
        assert (seed_dir(runs, m, 1) / "record.json").read_text() == finished[m]
        failed = read_record(seed_dir(runs, m, 2))
        assert failed["status"] == "failed" and failed["error"].startswith("SimulatedCrash")
        assert any("SimulatedCrash" in line for line in failed["traceback"])
        state = json.loads((seed_dir(runs, m, 2) / "checkpoints" / "last" / "state.json").read_text())
        assert state["loop"]["global_step"] == 2
    # 3. the same sweep again: seed 2 resumes from step 2 and completes; seed 1 is still untouched.
    assert sweep(monkeypatch, root) == 0
    for m in ("finetune", "lora"):
        run_dir = seed_dir(runs, m, 2)
        rec = read_record(run_dir)
        assert rec["status"] == "complete" and rec["training"]["steps"] == 8
        assert "resumed from" in (run_dir / "train.log").read_text()
        assert len(list(run_dir.glob("record.*.json"))) == 1  # the failed record, kept aside
        assert (seed_dir(runs, m, 1) / "record.json").read_text() == finished[m]


@pytest.mark.slow
def test_tiny_sweep_produces_a_table(monkeypatch, tmp_path):
    """2 methods × 2 seeds on a tiny GPT-2, then the table from their records."""
    from kpeft.tables import main as tables

    root = tmp_path / "runs"
    assert sweep(monkeypatch, root) == 0
    out = tables(["experiment=table_smoke", f"output_root={root}", "--out", str(tmp_path / "tables")])
    assert (out["runs"], out["complete"], out["missing"]) == (6, 4, 2)  # BitFit was not swept
    md = Path(out["markdown"]).read_text()
    assert "| small | BitFit | — | — | — (0/2) |" in md
    lora = next(line for line in md.splitlines() if "| LoRA-4 |" in line)
    assert " ± " in lora
