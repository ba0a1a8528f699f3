"""One run = one config (docs/runs.md): what `--cfg job` prints is what runs and is recorded, run
directories by semantic config, refusal of another config's record, validation before work, the
run-directory lock and the clean-up of temporary files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kpeft.compose import available, compose
from kpeft.config import CONF_DIR
from kpeft.errors import KpeftError
from kpeft.experiments.build import build
from kpeft.experiments.collect import collect, load_runs
from kpeft.experiments.render import markdown
from kpeft.experiments.spec import Column, Group, Row, TableSpec, TaskColumns
from kpeft.paths import REPO_ROOT
from kpeft.records import read_record, write_record
from kpeft.runid import OVERRIDES_FILE, semantic
from kpeft.runlock import HOLDER_NAME, RunLock, RunLocked, clean_tmp
from kpeft.train import run

TINY = ("model=tiny_gpt2", "task=demo_reverse", "method=lora", "budget=small", "train.epochs=1",
        "task.options.n_train=32", "task.options.n_val=8", "task.options.n_test=8")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kpeft.train", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


# ---------------------------------------------------------------- one composition
def representative(data: dict) -> list[str]:
    """A method (and budget) the preset runs: its table's first row, else its first table method."""
    table = ((data.get("hydra") or {}).get("sweeper") or {}).get("table") or {}
    for group in table.get("groups") or []:
        for row in group.get("rows") or []:
            budget = row.get("budget") or group.get("budget")
            return [f"method={row['method']}", *([f"budget={budget}"] if budget else [])]
    return [f"method={m}" for m in list(data.get("method_train") or {})[:1]]


def preset_cases() -> list[list[str]]:
    """Every experiment preset with a method it runs, plus one method of its per-method tables
    with a per-task entry when it has one, so that the tables are exercised."""
    cases = []
    for name in available("experiment"):
        data = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
        cases.append([f"experiment={name}", *representative(data)])
        entries = [(m, e) for table in ("method_train", "method_overrides")
                   for m, e in (data.get(table) or {}).items() if (e or {}).get("by_task")]
        if entries:
            method, entry = entries[0]
            task = next(t for t in entry["by_task"] if t in available("task"))
            cases.append([f"experiment={name}", f"method={method}", f"task={task}"])
    return cases


CASES = preset_cases()
PRINT_ALL = """
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
from kpeft.train import main
out = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["kpeft.train", *args, "--cfg", "job"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main()
        except SystemExit as err:
            assert not err.code, err.code
    GlobalHydra.instance().clear()
    out.append(buf.getvalue())
print(json.dumps(out))
"""


def test_cfg_job_is_the_config_run_stores_for_every_preset():
    """``--cfg job`` of the real CLI (every preset, and a per-method/per-task table entry of each
    preset that has one) equals the config `run` receives and stores in the record."""
    assert len(CASES) > len(available("experiment"))  # some presets' tables are exercised
    proc = subprocess.run([sys.executable, "-c", PRINT_ALL, json.dumps(CASES)], capture_output=True,
                          text=True, env=ENV, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    for args, text in zip(CASES, printed):
        shown = resolved(OmegaConf.create(text))
        assert shown == resolved(compose(args)), args


def test_hydra_flags_reach_hydra():
    short = cli("-c", "job", "experiment=krona_glue", "method=krona", "task=glue_rte", "train.batch_size=50")
    assert short.returncode == 0, short.stderr[-2000:]
    shown = OmegaConf.create(short.stdout)
    assert shown.train.lr == 0.002 and shown.train.batch_size == 50 and shown.run_overrides == ["train.batch_size=50"]
    info = cli("--info", "config")
    assert info.returncode == 0 and "Config" in info.stdout
    typo = cli("--cfg", "job", "train.lrr=1")
    assert typo.returncode == 2 and typo.stderr.startswith("kpeft: error: unknown key 'train.lrr'")


def test_tables_are_applied_in_composition_and_the_command_line_wins():
    cfg = compose(["experiment=krona_glue", "method=krona", "task=glue_rte"])
    assert cfg.train.lr == 0.002  # method_train.krona.by_task.glue_rte, not the preset's 1e-3
    assert cfg.run_id == "" and cfg.run_dir.endswith("krona_glue/glue_rte/t5_base/krona-t5_glue/seed123")
    mine = compose(["experiment=krona_glue", "method=krona", "task=glue_rte", "train.lr=0.5"])
    assert mine.train.lr == 0.5 and list(mine.run_overrides) == ["train.lr=0.5"]
    assert mine.run_dir == cfg.run_dir + mine.run_id and len(mine.run_id) == 9
    sizes = compose(["experiment=krona_glue", "method=krona", "task=glue_qnli"])
    assert list(sizes.method.components.krona.a_shape) == [3, 256] and sizes.run_id == ""


def test_committed_records_keep_their_paths_and_match_their_config():
    found = 0
    for path in sorted((REPO_ROOT / "results" / "runs" / "nlu_mini").rglob("record.json"))[:3]:
        rec = json.loads(path.read_text())
        cfg = compose(["experiment=nlu_mini", f"method={rec['method']}", f"seed={rec['seed']}"])
        assert REPO_ROOT / cfg.run_dir == path.parent and cfg.run_id == ""
        now, then = semantic(resolved(cfg)), semantic(rec["config"])
        assert {k: v for k, v in now.items() if k in then and then[k] != v} == {}
        found += 1
    assert found == 3


def test_non_semantic_overrides_keep_the_path():
    plain = compose(list(TINY))
    same = compose([*TINY, "train.progress=false", "train.num_workers=2", "force=true", "logger.project=x",
                    "train.eval_batch_size=7", "output_root=elsewhere"])
    assert same.run_id == plain.run_id and list(same.run_overrides) == list(plain.run_overrides)
    assert compose([*TINY, "seed=5"]).run_id == plain.run_id  # the seed is in the path already
    assert compose([*TINY, "train.lr=0.2"]).run_id != plain.run_id


# ---------------------------------------------------------------- one directory per config
def test_an_lr_sweep_gives_two_records_and_a_rerun_skips_exactly_them(tmp_path):
    args = ("-m", *TINY, "train.lr=0.1,0.2", f"output_root={tmp_path}", "train.progress=false")
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    paths = sorted(tmp_path.rglob("record.json"))
    assert len(paths) == 2 and paths[0].parent != paths[1].parent
    lrs = sorted(json.loads(p.read_text())["config"]["train"]["lr"] for p in paths)
    assert lrs == [0.1, 0.2]
    for p in paths:
        rec = json.loads(p.read_text())
        lines = (p.parent / OVERRIDES_FILE).read_text().splitlines()
        assert f"train.lr={rec['config']['train']['lr']}" in lines and rec["overrides"] == lines
        assert p.parent.name == f"seed123{rec['run_id']}"
        # what Hydra saved for the job is what ran
        assert resolved(OmegaConf.load(p.parent / ".hydra" / "config.yaml")) == rec["config"]
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skip: ") == 2
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("record.json"))] == stamps


def fake_complete(cfg, **changes) -> Path:
    """A complete record of `cfg` (with `changes` to its train section) in its run directory."""
    config = resolved(cfg)
    config["train"].update(changes)
    write_record(cfg.run_dir, {"status": "complete", "score": 1.0, "config": config})
    return Path(cfg.run_dir)


def test_a_record_of_another_config_is_refused_naming_the_keys(make_cfg):
    cfg = make_cfg(*TINY)
    fake_complete(cfg, lr=0.5, weight_decay=0.3)
    with pytest.raises(KpeftError, match=r"another config \(differs in train\.lr, train\.weight_decay\); "
                                         r"re-run it with force=true .* or choose a new experiment=NAME"):
        run(cfg)


def test_the_same_config_is_skipped_and_tmp_leftovers_are_cleaned(make_cfg):
    cfg = make_cfg(*TINY)
    run_dir = fake_complete(cfg)
    (run_dir / ".record.json.abc123.tmp").write_text("{")
    (run_dir / "checkpoints" / "last.tmp").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.tmp" / "state.json").write_text("{")
    assert run(cfg)["score"] == 1.0
    assert sorted(p.name for p in run_dir.rglob("*.tmp")) == []
    assert not (run_dir / HOLDER_NAME).exists()  # the lock was released


def test_a_record_older_than_a_config_field_is_still_this_config(make_cfg):
    cfg = make_cfg(*TINY)
    config = resolved(cfg)
    del config["train"]["label_smoothing"]
    write_record(cfg.run_dir, {"status": "complete", "score": 2.0, "config": config})
    assert run(cfg)["score"] == 2.0


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-4", r"train\.batch_size=-4 is out of range: it must be ≥ 1"),
    ("train.batch_size=0", r"train\.batch_size=0 is out of range"),
    ("train.epochs=0", r"train\.epochs=0 is out of range"),
    ("train.grad_accum=0", r"train\.grad_accum=0 is out of range"),
    ("train.lr=0", r"train\.lr=0.0 is out of range"),
    ("train.lr=-1e-3", r"train\.lr=-0.001 is out of range"),
    ("train.eval_batch_size=0", r"train\.eval_batch_size=0"),
    ("train.max_steps=0", r"train\.max_steps=0"),
    ("train.warmup_ratio=1.5", r"train\.warmup_ratio=1.5"),
    ("train.label_smoothing=1.0", r"train\.label_smoothing=1.0"),
    ("train.adam_betas=[0.9,1.0]", r"train\.adam_betas"),
    ("train.mixed_precision=fp8", r"train\.mixed_precision=fp8 is not valid; valid: auto, no, bf16, fp16"),
    ("task.max_length=0", r"task\.max_length=0"),
    ("+task.options.max_eval_examples=0", r"task\.options\.max_eval_examples=0"),
    ("fidelity=exact", r"fidelity=exact is not valid"),
])
def test_out_of_range_values_are_one_line_errors(override, message):
    with pytest.raises(KpeftError, match=message) as err:
        compose([*TINY, override])
    assert "\n" not in str(err.value)


def test_relations_are_checked():
    with pytest.raises(KpeftError, match=r"train\.warmup_steps=10 exceeds train\.max_steps=5"):
        compose([*TINY, "train.max_steps=5", "train.warmup_steps=10"])
    with pytest.raises(KpeftError, match=r"train\.batch_size=30 must be divisible by train\.grad_accum=4"):
        compose([*TINY, "train.batch_size=30", "train.grad_accum=4"])
    assert compose([*TINY, "train.max_steps=3", "train.epochs=0"]).train.max_steps == 3


@pytest.mark.parametrize("override", ["train.batch_size=-4", "train.epochs=0", "train.grad_accum=0"])
def test_bad_ranges_exit_non_zero_in_one_line_without_a_record(tmp_path, override):
    proc = cli(*TINY, override, f"output_root={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("kpeft: error: "), proc.stderr
    assert not list(tmp_path.rglob("record.json"))


def test_a_run_of_zero_steps_writes_no_record(make_cfg, monkeypatch):
    from kpeft.training.loop import LoopState, Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: LoopState())
    cfg = make_cfg(*TINY)
    with pytest.raises(KpeftError, match="trained 0 optimizer steps"):
        run(cfg)
    assert read_record(cfg.run_dir) is None


# ---------------------------------------------------------------- the run-directory lock
def test_a_second_process_exits_at_once_naming_the_holder(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, root=tmp_path)
    with RunLock(cfg.run_dir):
        proc = cli(*TINY, f"output_root={tmp_path}", "train.progress=false")
        with pytest.raises(RunLocked, match=f"in use by PID {os.getpid()}"):
            run(cfg)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"kpeft: error: {cfg.run_dir} is in use by PID {os.getpid()}; wait for it to "
                                   "finish, or stop that process (a dead process's lock is taken over automatically)")
    assert not list(tmp_path.rglob("record.json"))


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text("")
    (tmp_path / HOLDER_NAME).write_text(f"{dead.pid} somehost\n")
    with caplog.at_level("INFO", logger="kpeft.runlock"), RunLock(tmp_path):
        assert (tmp_path / HOLDER_NAME).read_text().split()[0] == str(os.getpid())
    assert f"taking over the lock of PID {dead.pid}" in caplog.text
    assert not (tmp_path / HOLDER_NAME).exists()


def test_clean_tmp_removes_only_temporary_files(tmp_path):
    keep = [tmp_path / "record.json", tmp_path / "checkpoints" / "last" / "state.json"]
    drop = [tmp_path / ".record.json.x1.tmp", tmp_path / "predictions" / "test.jsonl.tmp"]
    for path in keep + drop:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / "checkpoints" / "best.tmp").mkdir()
    removed = clean_tmp(tmp_path)
    assert {p.name for p in removed} == {".record.json.x1.tmp", "test.jsonl.tmp", "best.tmp"}
    assert all(p.exists() for p in keep) and not any(p.exists() for p in drop)


# ---------------------------------------------------------------- tables group by what ran
def table_record(root: Path, seed: int, score: float, lr: float, run_id: str = "", created: str = "") -> None:
    run_dir = root / "t" / "m" / f"lora-small/seed{seed}{run_id}"
    write_record(run_dir, {
        "status": "complete", "task": "t", "model": "m", "method": "lora", "budget": "small", "seed": seed,
        "run_id": run_id, "overrides": [f"train.lr={lr}"] if run_id else [], "created": created,
        "metrics": {"test": {"accuracy": score}}, "params": {},
        "config": {"seed": seed, "train": {"lr": lr}, "method": {"components": {"said": {"seed": seed}}}}})


SPEC_1 = TableSpec(title="x", tasks=[TaskColumns(task="t", seeds=[1, 2], columns=[Column("accuracy")])],
                   groups=[Group(name="g", budget="small", rows=[Row(method="lora", label="LoRA")])])


def test_tables_choose_the_preset_record_and_flag_mixed_configs(tmp_path):
    table_record(tmp_path, 1, 80.0, 1e-3)
    table_record(tmp_path, 1, 99.0, 0.5, run_id="-abcdef12")  # an lr experiment beside the preset run
    table_record(tmp_path, 2, 82.0, 1e-3)
    view = build(SPEC_1, "m", collect(SPEC_1, "m", load_runs(tmp_path)))
    cell = view.rows[0].cells[0]
    assert cell.summary.mean == pytest.approx(81.0) and cell.differs == [] and view.ignored == 1
    (tmp_path / "t" / "m" / "lora-small" / "seed2" / "record.json").unlink()
    table_record(tmp_path, 2, 84.0, 2e-3)  # seed 2 ran with another learning rate (a changed preset)
    view = build(SPEC_1, "m", collect(SPEC_1, "m", load_runs(tmp_path)))
    assert view.rows[0].cells[0].differs == ["train.lr"]
    md = markdown(view)
    assert "**82.00 ± 2.83**‡" in md and "‡ configs differ within a cell: t lora-small: train.lr" in md


@pytest.mark.slow
def test_under_torchrun_every_process_stops_when_the_directory_is_held(make_cfg, tmp_path):
    """Only the main process takes the lock; the other learns it failed and stops too (no hang)."""
    cfg = make_cfg(*TINY, root=tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    with RunLock(cfg.run_dir):
        proc = subprocess.run([*torchrun, "-m", "kpeft.train", *TINY, f"output_root={tmp_path}", "train.progress=false"],
                              capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by PID {os.getpid()}") == 2, proc.stderr[-3000:]
    assert not list(tmp_path.rglob("record.json"))
