"""Records that reproduce (docs/reproduce.md): provenance in every record, ``python -m
kpeft.reproduce`` re-running a committed record exactly, and a doctored record caught."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kpeft.experiments.build import build
from kpeft.experiments.collect import collect, load_runs
from kpeft.experiments.render import markdown
from kpeft.experiments.spec import Column, Group, Row, TableSpec, TaskColumns
from kpeft.paths import REPO_ROOT
from kpeft.records import git_state, lock_state, read_record, write_record
from kpeft.reproduce import main

# Made by `python -m kpeft.train` with the code of its commit (tests/fixtures/records/README.md).
FIXTURE = REPO_ROOT / "tests/fixtures/records/default/glue_sst2/tiny_bert/lora-tiny/seed1-bc533cf7"
NLU_MINI_LORA = REPO_ROOT / "results/runs/nlu_mini/glue_sst2/minilm_l6/lora-nlu/seed1"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """The fixture record reproduced once (the re-run in `out` is reused by the doctored copy)."""
    out = tmp_path_factory.mktemp("reproduce")
    return out, main([str(FIXTURE), "--out", str(out)])


def test_committed_record_reproduces_exactly(rerun, capsys):
    out, summary = rerun
    assert summary["reproduced"] is True and summary["differs"] == {}
    assert summary["tolerance"] == {"absolute": 1e-9, "relative": 0.0}
    now = read_record(summary["rerun_dir"])
    recorded = read_record(FIXTURE)
    assert now["metrics"] == recorded["metrics"] and now["params"] == recorded["params"]
    assert Path(summary["rerun_dir"]).is_relative_to(out)  # the run directory is not touched
    assert sorted(p.name for p in FIXTURE.iterdir()) == ["overrides.txt", "record.json"]


def test_doctored_record_fails_and_names_the_difference(rerun, tmp_path, capsys):
    out, _ = rerun
    doctored = tmp_path / "doctored"
    shutil.copytree(FIXTURE, doctored)
    rec = read_record(doctored)
    rec["metrics"]["test"]["accuracy"] += 0.5
    (doctored / "record.json").write_text(json.dumps(rec))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(doctored), "--out", str(out)])
    assert exit_.value.code == 1
    printed = capsys.readouterr().out.splitlines()
    row = next(line for line in printed if "metrics.test.accuracy" in line)
    assert row.startswith("✗") and "-0.5" in row
    summary = json.loads(printed[-1])
    assert summary["reproduced"] is False
    assert set(summary["differs"]) == {"metrics.test.accuracy"}
    assert summary["differs"]["metrics.test.accuracy"]["diff"] == pytest.approx(-0.5)
    # A wider tolerance accepts it.
    assert main([str(doctored), "--out", str(out), "--tolerance", "0.6"])["reproduced"] is True


def test_changed_code_is_named_when_metrics_differ(rerun, tmp_path, capsys):
    out, _ = rerun
    doctored = tmp_path / "old"
    shutil.copytree(FIXTURE, doctored)
    rec = read_record(doctored)
    rec["metrics"]["validation_loss"] += 1e-6
    rec["git"] = {"commit": "0" * 40, "dirty": True}
    rec["lock"]["sha256"] = "f" * 64
    (doctored / "record.json").write_text(json.dumps(rec))
    with pytest.raises(SystemExit):
        main([str(doctored), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "the code has changed since this record was made" in printed
    assert "code: commit 000000000000+dirty(diff not recorded) → " in printed
    assert "environment: lock ffffffffffff → " in printed
    summary = json.loads(printed.splitlines()[-1])
    assert summary["code_changed"] is True and set(summary["differs"]) == {"metrics.validation_loss"}
    assert summary["differs"]["metrics.validation_loss"]["diff"] == pytest.approx(-1e-6, abs=1e-12)


def test_a_record_in_the_nlu_mini_layout(rerun, tmp_path, capsys):
    """A record laid out as results/runs/nlu_mini/<task>/<model>/<method>-<budget>/seed1 (no hash
    suffix, relative output_root) in schema 1 (no lock, data files or diff), whose data were read
    from a folder that is not on this machine: one line naming the fix, then reproduced."""
    out, _ = rerun
    relative = Path("nlu_mini/glue_sst2/tiny_bert/lora-tiny/seed1")
    run_dir = tmp_path / "results/runs" / relative
    shutil.copytree(FIXTURE, run_dir)
    rec = read_record(run_dir)
    del rec["lock"], rec["data"]
    rec.update(schema=1, experiment="nlu_mini", git={"commit": "2cfcd8ca75bf" + "0" * 28, "dirty": True})
    rec["config"].update(experiment="nlu_mini", output_root="results/runs", run_dir=f"results/runs/{relative}")
    rec["config"]["task"]["data_dir"] = "/elsewhere/glue/SST-2"
    (run_dir / "record.json").write_text(json.dumps(rec))
    with pytest.raises(SystemExit) as exit_:
        main([str(run_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0] == ("kpeft: error: the record read its data from '/elsewhere/glue/SST-2', which is not on this "
                      "machine; pass task.data_dir=DIR, a folder holding the same files")
    data = REPO_ROOT / "tests/fixtures/glue/SST-2"
    summary = main([str(run_dir / "record.json"), f"task.data_dir={data}", "--out", str(out)])
    assert summary["reproduced"] is True and summary["differs"] == {}
    assert summary["run_dir"] == str(run_dir) and summary["rerun_dir"] == str(out / relative)
    assert summary["code_changed"] is True
    assert summary["provenance"][0].startswith("code: commit 2cfcd8ca75bf+dirty(diff not recorded) → ")
    assert "data: the record lists no data files (made before records carried them)" in summary["provenance"]
    assert any(line.startswith("environment: lock not recorded → ") for line in summary["provenance"])
    assert read_record(out / relative)["data"]["files"][0]["sha256"] == read_record(FIXTURE)["data"]["files"][0]["sha256"]


def test_new_records_carry_what_reproduction_needs(rerun):
    _, summary = rerun
    rec = read_record(summary["rerun_dir"])
    assert rec["schema"] == 2
    assert rec["git"]["commit"] == git("rev-parse", "HEAD").strip()
    if git("status", "--porcelain", "--untracked-files=no").strip():
        assert rec["git"]["dirty"] is True and len(rec["git"]["diff_sha256"]) == 64
    assert rec["lock"] == {"file": "requirements/cpu.lock", "sha256": sha256(REPO_ROOT / "requirements/cpu.lock")}
    assert {"torch", "transformers", "peft", "accelerate", "datasets", "numpy", "hydra-core", "tokenizers"} <= set(
        rec["versions"])
    files = {Path(f["path"]).name: f for f in rec["data"]["files"]}
    assert set(files) == {"train_subset_2000.tsv", "dev.tsv"}  # what the task read, nothing else
    for name, entry in files.items():
        path = REPO_ROOT / "tests/fixtures/glue/SST-2" / name
        assert entry["sha256"] == sha256(path) and entry["bytes"] == path.stat().st_size
    assert rec["data"]["hub"] == []
    # The committed record says the same about the same files.
    assert read_record(FIXTURE)["data"]["files"][0]["sha256"] == rec["data"]["files"][0]["sha256"]


def test_git_state_hashes_the_diff_and_new_code_files(tmp_path):
    def run(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    run("init", "-q")
    (tmp_path / "kpeft").mkdir()
    (tmp_path / "kpeft" / "a.py").write_text("x = 1\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and "diff" not in clean
    (tmp_path / "kpeft" / "a.py").write_text("x = 2\n")
    (tmp_path / "kpeft" / "b.py").write_text("y = 3\n")  # untracked code: part of what ran
    (tmp_path / "notes.txt").write_text("not code")  # untracked elsewhere: not
    state = git_state(tmp_path)
    tracked = subprocess.run(["git", "diff", "HEAD", "--no-color", "--no-ext-diff"], cwd=tmp_path,
                             capture_output=True, check=True).stdout
    text = tracked + b"untracked file kpeft/b.py\ny = 3\n"
    assert state["commit"] == clean["commit"] and state["dirty"] is True
    assert state["untracked"] == ["kpeft/b.py"] and "-x = 1" in state["diff"] and "+x = 2" in state["diff"]
    assert state["diff"].encode() == text and state["diff_sha256"] == hashlib.sha256(text).hexdigest()
    (tmp_path / "kpeft" / "b.py").write_text("y" * 300_000)
    big = git_state(tmp_path)
    assert big["diff"] is None and len(big["diff_sha256"]) == 64  # over the cap: the hash only


def test_provenance_outside_a_git_checkout(tmp_path):
    state = git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None and "not a git checkout" in state["reason"]
    assert lock_state(tmp_path)["sha256"] is None


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: run_dir (see"),
    (["/nonexistent/run"], "does not exist"),
    ([str(FIXTURE / "overrides.txt")], "is a file; pass the run directory that holds a record.json"),
    ([str(FIXTURE.parent)], "has no readable record.json"),
    ([str(FIXTURE), "seed=2"], "'seed' changes what the run computes"),
    ([str(FIXTURE), "task.data_dir"], "is not KEY=VALUE"),
    ([str(FIXTURE), "--out", str(FIXTURE / "x")], "inside the run directory"),
    ([str(FIXTURE), "--tolerance", "-1"], "--tolerance must be a number >= 0"),
])
def test_wrong_inputs_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("kpeft: error: ") and message in err[-1]


def test_table_footer_names_mixed_code_and_lock_versions(tmp_path):
    spec = TableSpec(title="T", source="s", split="test", tasks=[TaskColumns("t", "T", [1, 2], [Column("acc", "Acc")])],
                     groups=[Group("g", "small", [Row("lora", "LoRA")])])
    for seed, commit, lock in ((1, "a" * 40, "1" * 64), (2, "b" * 40, "1" * 64)):
        run_dir = tmp_path / f"seed{seed}"
        write_record(run_dir, {"status": "complete", "task": "t", "model": "m", "method": "lora", "budget": "small",
                               "seed": seed, "metrics": {"test": {"acc": 1.0}}, "config": {},
                               "git": {"commit": commit, "dirty": False}, "lock": {"sha256": lock}})
    md = markdown(build(spec, "m", collect(spec, "m", load_runs(tmp_path))))
    assert "records made by 2 code versions: aaaaaaaaaaaa (1), bbbbbbbbbbbb (1)" in md
    assert "lock versions" not in md and "python -m kpeft.reproduce" in md


@pytest.mark.slow
def test_nlu_mini_lora_seed1_reproduces(tmp_path, capsys):
    """The committed nlu_mini record re-run with today's code and the repository's SST-2 sample.
    Fails until the committed records are regenerated with the current code (docs/reproduce.md)."""
    try:
        main([str(NLU_MINI_LORA), f"task.data_dir={REPO_ROOT / 'tests/fixtures/glue/SST-2'}", "--out", str(tmp_path)])
    except SystemExit:
        pass
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["reproduced"] is True, summary["verdict"] + f"; differs: {summary['differs']}"
