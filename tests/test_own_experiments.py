"""Experiments of your own (docs/experiments.md): experiment=NAME without a preset, tables of the
records found (rows, baseline, readable figure), the preset template, strict and readable records,
evaluate-only and checkpoint selection by a validation metric."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import check_strict_records
from helpers import FIXTURES

from kpeft.errors import KpeftError
from kpeft.paths import PACKAGED_TOKENIZERS
from kpeft.records import read_record, write_record


def _run(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ experiment=NAME
def test_experiment_without_a_preset_is_the_default_config_in_its_own_folder(make_cfg):
    mine = make_cfg("experiment=mine", "model=tiny_bert", "task=demo_sentiment", "method=lora")
    default = make_cfg("model=tiny_bert", "task=demo_sentiment", "method=lora")
    assert mine.experiment == "mine" and "/mine/demo_sentiment/tiny_bert/lora-intermediate/seed123" in mine.run_dir
    assert mine.run_id == "" and mine.train == default.train and mine.method == default.method
    assert make_cfg("experiment=nlu_mini").run_dir.endswith("nlu_mini/glue_sst2/minilm_l6/kernel_mix_qvo-nlu/seed123")
    with pytest.raises(KpeftError, match="unknown model 'tiny_bertt'; valid: "):
        make_cfg("model=tiny_bertt")
    with pytest.raises(KpeftError, match="is not a folder name"):
        make_cfg("experiment=a/b")


def test_template_composes_as_a_table_preset():
    from kpeft.experiments.preset import compose_preset, declared_spec
    from kpeft.experiments.spec import cells

    cfg = compose_preset(["experiment=_template"])
    spec = declared_spec(cfg)
    assert cfg.experiment == "_template" and cfg.hydra.sweeper._target_.endswith("KpeftSweeper")
    assert [(c.method, c.seed) for c in cells(spec)] == [("lora", 1), ("bitfit", 1), ("lora", 2), ("bitfit", 2)]
    assert [r.baseline for r in spec.groups[0].rows] == [True, False]


def test_sweep_of_your_own_then_its_table(tmp_path):
    """The issue's commands: a 2-method × 2-seed sweep under a new experiment name, then its table."""
    sweep = _run("kpeft.train", "-m", "experiment=mine", "model=tiny_bert", "task=demo_sentiment",
                 "method=lora,bitfit", "seed=1,2", "train.progress=false", "train.max_steps=3", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    records = sorted((tmp_path / "results" / "runs" / "mine").rglob("record.json"))
    assert len(records) == 4
    for path in records:
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
        assert (path.parent / "checkpoints" / "best" / "adapter.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    table = _run("kpeft.tables", "experiment=mine", "--baseline", "lora", cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-2000:]
    summary = json.loads(table.stdout.strip().splitlines()[-1])
    assert (summary["runs"], summary["complete"], summary["missing"], summary["failed"]) == (4, 4, 0, 0)
    md = (tmp_path / summary["markdown"]).read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "±" in ln]
    assert len(rows) == 2 and "| lora |" in rows[0] and "| bitfit |" in rows[1]
    assert "kernel_mix_qvo" not in md and "Runs: 4 of 4 have a complete record." in md
    for row, method in zip(rows, ("lora", "bitfit")):  # each row: mean ± std (ddof 1) of its two seeds' records
        acc = [read_record(p)["metrics"]["test"]["accuracy"] for p in records if f"/{method}-" in str(p)]
        assert len(acc) == 2 and f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f}" in row
    import matplotlib.pyplot as plt  # after draw() chose the Agg backend

    fig = _figure_of(tmp_path / "results" / "runs" / "mine", ["lora"])
    _assert_readable(fig, rows=2)
    plt.close(fig)
    png = plt.imread(tmp_path / summary["figure"])
    assert png.shape[0] >= 150 and png.shape[1] >= 300 and png.std() > 0  # a real image, not a blank one
    bad = _run("kpeft.tables", "experiment=mine", "--baseline", "adapter", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "kpeft: error: --baseline adapter names no row; rows: bitfit, lora")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ tables of found records
def _record(root: Path, method: str, seed: int, value: float, task: str = "demo_sentiment", model: str = "tiny_bert",
            budget: str = "tiny") -> None:
    write_record(root / task / model / f"{method}-{budget}" / f"seed{seed}", {
        "status": "complete", "task": task, "model": model, "method": method, "budget": budget, "seed": seed,
        "metrics": {"test": {"accuracy": value}}, "params": {"trainable_pct": 0.5, "stored_pct": 0.5},
        "config": {"train": {"lr": 0.001 * seed}}})


def test_table_of_a_glob_with_rows_baseline_and_significance(tmp_path):
    from kpeft.tables import main

    root = tmp_path / "runs"
    for seed, (a, b) in enumerate([(80.0, 70.0), (81.0, 70.5), (80.5, 70.2)], start=1):
        _record(root, "lora", seed, a)
        _record(root, "bitfit", seed, b)
    out = main([str(root / "*" / "*" / "*" / "seed*"), "--baseline", "lora", "--name", "g", "--out", str(tmp_path / "t")])
    md = Path(out["markdown"]).read_text()
    assert (out["runs"], out["missing"]) == (6, 0)
    assert "| tiny | lora | 0.50 | 0.50 | **80.50 ± 0.50** |" in md
    assert "| bitfit | 0.50 | 0.50 | 70.23 ± 0.25\\* |" in md  # tested against lora (Welch p < 0.05)
    out = main([str(root), "--rows", "method", "--cols", "train.lr", "--metric", "accuracy", "--no-figure",
                "--out", str(tmp_path / "t")])
    md = Path(out["markdown"]).read_text()
    assert "| 0.001 accuracy | 0.002 accuracy | 0.003 accuracy |" in md and out["runs"] == 6
    assert "| all | bitfit | 0.50 | 0.50 | 70.00 | 70.50 | 70.20 |" in md


def test_preset_without_a_table_counts_only_the_runs_it_has(tmp_path):
    """demo declares no table: the table is its records, not method_train's methods or the default method."""
    from kpeft.tables import main

    root = tmp_path / "runs"
    for seed in (1, 2):
        _record(root / "demo", "lora", seed, 80.0 + seed, model="minilm_l6")
        _record(root / "demo", "bitfit", seed, 70.0 + seed, model="minilm_l6")
    out = main(["experiment=demo", f"output_root={root}", "--out", str(tmp_path / "t"), "--no-figure"])
    md = Path(out["markdown"]).read_text()
    assert (out["runs"], out["complete"]) == (4, 4)
    assert "kernel_mix_qvo" not in md and "finetune" not in md and "Runs: 4 of 4" in md
    assert "no row is a baseline (name one with --baseline" in md and "\\*" not in md.split("Mean ±")[0]


def test_baseline_of_a_declared_table(tmp_path, capsys):
    """A paper preset keeps its layout; --baseline replaces its baselines, and a name of no row is one line."""
    from kpeft.tables import main

    root = tmp_path / "runs"
    out = main(["experiment=nlu_mini", f"output_root={root}", "--baseline", "lora", "--no-figure",
                "--out", str(tmp_path / "t")])
    md = Path(out["markdown"]).read_text()
    assert out["complete"] == 0 and out["runs"] == out["missing"] > 0 and "| LoRA |" in md
    with pytest.raises(SystemExit) as exit_:
        main(["experiment=nlu_mini", f"output_root={root}", "--baseline", "lorra", "--no-figure",
              "--out", str(tmp_path / "t")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == (
        "kpeft: error: --baseline lorra names no row of experiment 'nlu_mini'; rows: adapter, bitfit, finetune, "
        "inducer_lora, kernel_mix_qvo, krona, lora, mam_adapter, prefix")


def _figure_of(root: Path, baseline: list[str]):
    """The table figure of the records under `root`, drawn as ``kpeft.tables`` draws it."""
    from kpeft.experiments.build import build, only_found
    from kpeft.experiments.figure import draw
    from kpeft.experiments.found import find_records, found_table

    spec, runs, used = found_table(find_records([str(root)]), baseline=baseline)
    return draw(only_found(build(spec, "tiny_bert", runs, 10), runs, used))


def _assert_readable(fig, rows: int) -> None:
    """One y label per row, no two tick labels overlapping, every label inside the figure and legible."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    for labels, least in ((ax.get_yticklabels(), rows), (ax.get_xticklabels(), 2)):
        boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
        assert len(boxes) >= least
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (a, b)
    for t in ax.get_yticklabels():
        box = t.get_window_extent(renderer)
        assert box.x0 >= fig.bbox.x0 - 1 and box.height > 5


def test_figure_labels_never_overlap_at_twelve_rows(tmp_path):
    root = tmp_path / "runs"
    for i in range(12):
        for seed in (1, 2):
            _record(root, f"method_with_a_rather_long_name_{i:02d}", seed, 50.0 + i + seed / 10,
                    budget="tiny" if i < 6 else "a_second_budget_group")
    fig = _figure_of(root, ["method_with_a_rather_long_name_00"])
    import matplotlib.pyplot as plt  # after draw() chose the Agg backend

    assert len(fig.axes[0].get_yticklabels()) == 12
    _assert_readable(fig, rows=12)
    plt.close(fig)


# ------------------------------------------------------------------ records
def test_records_are_strict_json_with_the_umask_mode(tmp_path):
    path = write_record(tmp_path / "run", {"status": "complete", "training": {"best_val_loss": float("inf")},
                                           "metrics": {"test": {"bleu": float("nan"), "ter": 0.25}}})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["training"]["best_val_loss"] is None and data["metrics"]["test"]["ter"] == 0.25
    assert data["non_finite"] == {"training.best_val_loss": "Infinity", "metrics.test.bleu": "NaN"}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    bad = tmp_path / "bad" / "record.json"
    bad.parent.mkdir()
    bad.write_text('{"x": Infinity}')
    with pytest.raises(AssertionError, match="not strict JSON"):
        check_strict_records(tmp_path / "bad")
    bad.unlink()


def test_coqa_scoring_warns_per_missing_turn(tmp_path, capsys):
    from kpeft.metrics.coqa import evaluate, gold_from_json

    gold, sources = gold_from_json(json.loads((FIXTURES / "coqa" / "coqa-dev-v1.0.first_story.json").read_text()))
    keys = sorted(gold)
    preds = {k: gold[k][0] for k in keys[: len(keys) // 2]}
    out = evaluate(gold, sources, preds)
    err = capsys.readouterr().err.splitlines()
    missing = keys[len(keys) // 2:]
    assert out["turns"] == len(keys) and out["missing"] == len(missing)
    assert err == [f"Missing prediction for {k[0]} and turn_id: {k[1]}" for k in missing]


# ------------------------------------------------------------------ evaluate-only, select_by
@pytest.fixture(scope="module")
def cnndm_dir(tmp_path_factory):
    from kpeft.tasks.cnndm import read_story

    pairs = [dict(zip(("src", "tgt"), read_story(p))) for p in sorted((FIXTURES / "cnn_dm" / "stories").glob("*.story"))]
    folder = tmp_path_factory.mktemp("cnndm")
    (folder / "data.json").write_text(json.dumps({"train": pairs[:10], "val": pairs[10:15], "test": pairs[15:20]}))
    return folder


def _cnndm(data_dir: Path, root: Path, *extra: str) -> list[str]:
    """A tiny random GPT-2 fine-tuned on 8 CNN/DM stories at a high learning rate: within ten steps its
    greedy 8-token summaries go from nothing to repeated common words, so validation ROUGE-1 moves."""
    return ["kpeft.train", "model=tiny_gpt2", f"model.tokenizer={PACKAGED_TOKENIZERS['gpt2']}", "method=finetune",
            "task=cnndm", f"task.data_dir={data_dir}", "task.options.max_source_tokens=60",
            "task.options.max_target_tokens=20", "task.options.max_train_examples=8",
            "task.options.max_eval_examples=5", "task.options.max_new_tokens=8", "train.batch_size=4",
            "train.eval_batch_size=2", "train.epochs=5", "train.lr=0.2", "train.warmup_steps=0",
            "train.early_stopping_patience=0", "train.progress=false", f"output_root={root}", *extra]


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    rows = [ln.split(",") for ln in (run_dir / "metrics.csv").read_text().splitlines()[1:]]  # step,epoch,key,value
    return {int(step): float(value) for step, _, k, value in rows if k == key}


def _evaluate(run_dir: Path, *args: str) -> tuple[dict, dict]:
    proc = _run("kpeft.evaluate", str(run_dir), *args, cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, json.loads(Path(summary["evaluation"]).read_text(), parse_constant=lambda c: pytest.fail(c))


def test_select_by_a_generation_metric_then_evaluate_only(tmp_path, cnndm_dir):
    proc = _run(*_cnndm(cnndm_dir, tmp_path, "train.select_by=rouge1", "train.eval_every_steps=1",
                        "train.val_generation_examples=3"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.rglob("record.json")
    run_dir, rec = path.parent, read_record(path)
    training = rec["training"]
    assert (training["selected_by"], training["select_mode"], training["steps"]) == ("rouge1", "max", 10)
    rouge, loss = _logged(run_dir, "val/rouge1"), _logged(run_dir, "val/loss")
    assert list(rouge) == list(loss) == list(range(1, 11))  # every step: mid-epoch and at epoch ends
    assert len(set(rouge.values())) > 1  # the metric moved, so the choice means something
    best = max(rouge.values())
    best_step = next(s for s, v in rouge.items() if v == best)  # the first of equal values is kept
    assert (training["best_score"], training["best_step"]) == (best, best_step)
    assert best_step != min(loss, key=loss.get)  # selection by validation loss would have kept another step
    assert training["best_val_loss"] == min(loss.values())
    assert not (run_dir / "generations" / "validation.jsonl").exists()  # validations write nothing

    # Evaluate-only: the best checkpoint is the one saved at best_step; record.json is left alone.
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    summary, evaluation = _evaluate(run_dir)
    assert Path(summary["evaluation"]).parent == run_dir / "evaluations" and summary["checkpoint"] == "best"
    assert evaluation["metrics"]["test"] == rec["metrics"]["test"]  # as the run scored it
    _, on_val = _evaluate(run_dir, "split=validation")
    assert on_val["metrics"]["validation"]["loss"] == pytest.approx(loss[best_step], rel=1e-5)
    assert on_val["metrics"]["validation"]["rouge1"] != best  # all 5 items; validations decoded the first 3:
    _, capped = _evaluate(run_dir, "split=validation", "task.options.max_eval_examples=3")
    assert capped["metrics"]["validation"]["rouge1"] == pytest.approx(best)
    summary, on_val = _evaluate(run_dir, "split=validation", "checkpoint=last")
    assert Path(summary["evaluation"]).name.startswith("validation-")
    assert on_val["metrics"]["validation"]["loss"] == pytest.approx(loss[10], rel=1e-5)
    assert (run_dir / "evaluations" / Path(summary["evaluation"]).stem / "generations" / "validation.jsonl").is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    wrong = _run("kpeft.evaluate", str(run_dir), "checkpoint=middle", cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "kpeft: error: checkpoint=middle is not valid; valid: best, last"


def test_select_by_an_unknown_metric_is_one_line(tmp_path):
    proc = _run("kpeft.train", "model=tiny_bert", "task=demo_sentiment", "method=bitfit", "train.max_steps=1",
                "train.select_by=bleu", "train.progress=false", f"output_root={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "kpeft: error: train.select_by=bleu is not a validation metric of task 'demo_sentiment'; valid: val_loss, accuracy")


def test_no_validation_split_gives_null_best_val_loss_with_a_note(tmp_path):
    proc = _run("kpeft.train", "model=tiny_gpt2", "task=demo_reverse", "method=bitfit", "budget=tiny",
                "task.options.n_val=0", "train.max_steps=1", "train.progress=false", f"output_root={tmp_path}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.rglob("record.json")
    rec = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert rec["training"]["best_val_loss"] is None and "no validation split" in rec["training"]["selection_note"]
