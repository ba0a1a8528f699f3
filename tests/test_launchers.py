"""Hydra's launchers run kpeft sweeps (docs/cluster.md): the commands of README.md's "Scale out"
block, run as written (plus tiny data sizes), through joblib (processes), submitit_local and
submitit_slurm (its sbatch script and pickled jobs run by a stand-in for SLURM's commands) give the
records the basic launcher gives for the same configs; the kpeft sweeper skips finished runs and
records failed ones when its runs are in other processes. Real multiruns of tiny trainings."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from kpeft.compose import compose
from kpeft.experiments.preset import compose_preset
from kpeft.experiments.sweep import Job, record_lost
from kpeft.records import read_record, write_record
from kpeft.runlock import RunLock

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install 'kpeft[cluster]'")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'kpeft[cluster]'")

ROOT = Path(__file__).resolve().parents[1]
# 32 training examples, batch 8, 1 epoch = 4 steps: a run's directory is seed<S>-<hash> (a config of
# its own, docs/runs.md), so a worker that composed without kpeft's step would write elsewhere.
TINY = ["task.options.n_train=32", "task.options.n_val=8", "task.options.n_test=16", "train.batch_size=8",
        "train.epochs=1", "train.eval_batch_size=16", "train.progress=false"]
TABLE = ["experiment=table_smoke", "method=finetune,lora", "train.checkpoint_every_steps=2", *TINY]
VOLATILE = {"run_dir", "output_root"}  # where the run was written; everything else must be equal


def multirun(monkeypatch, root: Path, *args: str) -> int:
    """``python -m kpeft.train -m output_root=<root> …`` in this process (its jobs wherever the
    launcher puts them); its exit code."""
    from kpeft.train import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # joblib / submitit workers inherit it
    monkeypatch.setattr(sys, "argv", ["kpeft.train", "-m", f"output_root={root}", *args])
    try:
        main()
        return 0
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        GlobalHydra.instance().clear()


def documented() -> dict[str, list[str]]:
    """README.md's "Scale out" commands, ``{launcher: the arguments after python -m kpeft.train -m}``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^\*\*Scale out\*\*(.*?)^\*\*", text, re.S | re.M)
    assert section, 'README.md has no "**Scale out**" paragraph'
    commands = [shlex.split(line) for line in re.findall(r"^python -m kpeft\.train -m .*$", section.group(1), re.M)]
    assert commands and all(c[:4] == ["python", "-m", "kpeft.train", "-m"] for c in commands)
    return {next(a.split("=")[1] for a in c if a.startswith("hydra/launcher=")): c[4:] for c in commands}


def sweep_config(args: list[str]) -> list[str]:
    """The arguments that choose the runs (not the launcher nor its settings)."""
    return [a for a in args if not a.startswith(("hydra/launcher=", "hydra.launcher."))]


def cli(root: Path, *args: str, path: str | None = None) -> None:
    """``python -m kpeft.train -m output_root=<root> …`` as a user runs it (the module is
    ``__main__`` there), which must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PATH": path} if path else {})}
    proc = subprocess.run([sys.executable, "-m", "kpeft.train", "-m", f"output_root={root}", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def records(root: Path) -> dict[str, dict]:
    """``{run dir relative to root: record}``."""
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("record.json")}


def comparable(rec: dict) -> dict:
    """What a run computed and with which config (not where, nor when, nor how fast)."""
    return {
        "config": {k: v for k, v in rec["config"].items() if k not in VOLATILE},
        **{k: rec[k] for k in ("status", "run_id", "overrides", "score", "metrics", "params", "training")},
    }


def test_the_documented_commands_are_one_sweep_on_three_launchers():
    commands = documented()
    assert sorted(commands) == ["joblib", "slurm_gpu", "submitit_local"]
    assert len({tuple(sweep_config(args)) for args in commands.values()}) == 1  # the same 2 runs
    cluster_page = (ROOT / "docs" / "cluster.md").read_text(encoding="utf-8")
    for args in commands.values():
        assert shlex.join(["python", "-m", "kpeft.train", "-m", *args]) in cluster_page


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> dict[str, dict]:
    """The documented sweep's records through Hydra's basic (sequential, in-process) launcher."""
    root = tmp_path_factory.mktemp("basic")
    with pytest.MonkeyPatch.context() as mp:
        assert multirun(mp, root, *sweep_config(documented()["joblib"]), *TINY) == 0
    out = records(root)
    assert len(out) == 2 and all(re.search(r"/seed1-[0-9a-f]{8}$", d) for d in out)
    assert sorted(r["method"] for r in out.values()) == ["bitfit", "lora"]
    return out


def assert_same_runs(root: Path, basic: dict[str, dict]) -> None:
    got = records(root)
    assert sorted(got) == sorted(basic)  # the same run directories (kpeft's composition in the workers)
    for run_dir, rec in got.items():
        assert rec["status"] == "complete"
        assert comparable(rec) == comparable(basic[run_dir]), run_dir


def test_joblib_processes_equal_the_basic_launcher(tmp_path, basic):
    root = tmp_path / "runs"
    cli(root, *documented()["joblib"], *TINY)
    assert "JoblibLauncher" in (root / "default" / "multirun.yaml").read_text()
    assert_same_runs(root, basic)


def test_submitit_local_equals_the_basic_launcher(tmp_path, basic):
    root = tmp_path / "runs"
    cli(root, *documented()["submitit_local"], *TINY)
    assert len(list((root / "default" / ".submitit").glob("*/*_result.pkl"))) == 2  # two submitit jobs
    assert_same_runs(root, basic)


# ---------------------------------------------------------------- submitit_slurm without SLURM
# Stand-ins for SLURM's commands: `sbatch` keeps the script submitit wrote and, in the background
# (submitit moves the pickled jobs into place after sbatch returns), runs it once per array task as
# SLURM would (its environment variables set); `srun` runs its command; `sacct` reports each task
# RUNNING until its script has ended, then COMPLETED or FAILED.
SBATCH = r'''#!{python}
import os, re, shutil, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
script = shutil.copy(sys.argv[1], os.path.join(here, "submitted.sh"))
first, last = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)", open(script).read(), re.M).groups())
runner = f"""
import os, subprocess
for task in range({{first}}, {{last}} + 1):
    env = {{{{**os.environ, "SLURM_JOB_ID": str(4321 + task), "SLURM_ARRAY_JOB_ID": "4321",
           "SLURM_ARRAY_TASK_ID": str(task), "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "localhost"}}}}
    rc = subprocess.run(["bash", {{script!r}}], env=env).returncode
    open(os.path.join({{here!r}}, f"state_{{{{task}}}}"), "w").write("COMPLETED" if rc == 0 else "FAILED")
"""
with open(os.path.join(here, "jobs.log"), "w") as log:
    subprocess.Popen([sys.executable, "-c", runner], stdout=log, stderr=log, start_new_session=True)
print("Submitted batch job 4321")
'''
SRUN = r'''#!{python}
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args = args[2:] if args[0] in ("--output", "--error") else args[1:]
os.execvp(args[0], args)
'''
SACCT = r'''#!{python}
import os
here = os.path.dirname(os.path.abspath(__file__))
print("JobID|State|NodeList")
for task in (0, 1):
    path = os.path.join(here, f"state_{{task}}")
    print(f"4321_{{task}}|{{open(path).read() if os.path.exists(path) else 'RUNNING'}}|localhost")
'''


def fake_slurm(bin_dir: Path) -> Path:
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT)):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_submitit_slurm_sbatch_script_and_jobs_run(tmp_path, basic):
    """The documented command (hydra/launcher=slurm_gpu), with the README's other SLURM-only settings,
    writes one array job with the per-run resources, and its pickled jobs, run as SLURM would run
    them, give the basic launcher's records."""
    bin_dir = fake_slurm(tmp_path / "bin")
    root = tmp_path / "runs"
    resources = ["hydra.launcher.account=lab", "hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=8",
                 "hydra.launcher.array_parallelism=1", 'hydra.launcher.setup=["export KPEFT_SLURM_SETUP=1"]']
    cli(root, *documented()["slurm_gpu"], *resources, *TINY, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    script = (bin_dir / "submitted.sh").read_text()
    for flag in ("--array=0-1%1", "--partition=gpu", "--account=lab", "--gpus-per-node=1", "--cpus-per-task=2",
                 "--mem=8GB", "--time=60", "--ntasks-per-node=1", "--nodes=1"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "export KPEFT_SLURM_SETUP=1\n" in script and "submitit.core._submit" in script
    assert len(list((root / "default" / ".submitit").glob("4321_*/4321_*_0_result.pkl"))) == 2
    assert_same_runs(root, basic)


def test_slurm_preset_composes():
    cfg = compose_preset(["experiment=km_table1", "hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and cfg.hydra.sweeper._target_.endswith("KpeftSweeper")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.timeout_min) == (4, 1, 1440)


# ---------------------------------------------------------------- the kpeft sweeper with joblib
def test_table_sweep_on_joblib_skips_finished_runs_and_records_failures(monkeypatch, capsys, tmp_path):
    from kpeft.tables import main as tables

    def launched() -> list[int]:  # the jobs joblib was given, from its log line
        return [int(n) for n in re.findall(r"is launching (\d+) jobs", capsys.readouterr().out)]

    root = tmp_path / "runs"
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    # 1. seed 1 of both rows, in two worker processes.
    assert multirun(monkeypatch, root, *joblib, *TABLE, "seed=1") == 0
    assert launched() == [2]
    first = {d: json.dumps(r) for d, r in records(root).items()}
    assert len(first) == 2 and all(json.loads(r)["status"] == "complete" for r in first.values())
    # 2. the same sweep again launches nothing and leaves the records alone.
    assert multirun(monkeypatch, root, *joblib, *TABLE, "seed=1") == 0
    assert launched() == [] and {d: json.dumps(r) for d, r in records(root).items()} == first
    # 3. seed 2, "killed" after 3 steps in its workers: failed records, and the sweep exits 1.
    assert multirun(monkeypatch, root, *joblib, *TABLE, "seed=2", "train.crash_after_steps=3") == 1
    assert launched() == [2]
    seed2 = {r["method"]: r for r in records(root).values() if r["seed"] == 2}
    assert {m: (r["status"], r["error"]) for m, r in seed2.items()} == {
        m: ("failed", "SimulatedCrash: simulated crash after step 3") for m in ("finetune", "lora")}
    # 4. the table reports them: 2 of 6 runs complete, 4 without a complete record (BitFit was not
    #    swept), of which 2 failed, with their errors.
    out = tables(["experiment=table_smoke", f"output_root={root}", "--out", str(tmp_path / "t"), "--no-figure"])
    assert (out["runs"], out["complete"], out["missing"], out["failed"]) == (6, 2, 4, 2)
    assert "- demo_reverse lora-small seed 2: SimulatedCrash: simulated crash after step 3" in \
        Path(out["markdown"]).read_text()
    # 5. the same sweep again launches the two failed runs only; they resume from their step-2
    #    checkpoints and complete.
    assert multirun(monkeypatch, root, *joblib, *TABLE, "seed=2") == 0
    assert launched() == [2]
    for rec in (r for r in records(root).values() if r["seed"] == 2):
        assert rec["status"] == "complete" and rec["training"]["steps"] == 4
        assert "resumed from" in (Path(rec["run_dir"]) / "train.log").read_text()
        assert len(list(Path(rec["run_dir"]).glob("record.*.json"))) == 1  # the failed one, kept aside
    assert {d: json.dumps(r) for d, r in records(root).items() if "seed1" in d} == first


def test_a_job_that_died_gets_a_failed_record(tmp_path):
    """A job whose process died (no record) is recorded as failed after the launch, unless a live
    process holds its directory; a complete record is never replaced."""
    cfgs = [compose([f"output_root={tmp_path}", "experiment=table_smoke", f"method={m}", "seed=1"])
            for m in ("lora", "bitfit", "finetune")]
    jobs = [Job(None, [], Path(c.run_dir), False, c) for c in cfgs]  # type: ignore[arg-type]
    write_record(jobs[2].run_dir, {"status": "complete"})
    with RunLock(jobs[1].run_dir):  # bitfit: another process is still running it
        lost = record_lost(jobs, "lost by the launcher: TerminatedWorkerError: killed")
    assert lost == [jobs[0]]
    rec = read_record(jobs[0].run_dir)
    assert rec["status"] == "failed" and rec["error"] == "lost by the launcher: TerminatedWorkerError: killed"
    assert (rec["method"], rec["seed"], rec["config"]["run_dir"]) == ("lora", 1, str(jobs[0].run_dir))
    assert "hydra" not in rec["config"]
    assert read_record(jobs[1].run_dir) is None and read_record(jobs[2].run_dir) == {"status": "complete"}
