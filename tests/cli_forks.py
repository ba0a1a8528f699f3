"""Run many ``python -m kpeft.<cli> ARGS`` invocations from one interpreter: the CLI modules are
imported once, then each invocation runs in a forked child with its own working directory, its
own stdout/stderr files and its own exit status, as ``python -m`` would give them (an uncaught
exception prints its traceback and exits 1). Saves the interpreter start and the torch import
(seconds each) per invocation.

``python tests/cli_forks.py CASES.json RESULTS.json``: CASES is a list of ``{"cli", "args",
"cwd"}``; RESULTS the list of ``{"rc", "stdout", "stderr"}`` in the same order.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback

CLIS = ("train", "score", "tables", "count", "analyze", "bench")


def _child(case: dict, out: str, err: str) -> None:
    os.chdir(case["cwd"])
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    module = "kpeft.bench" if case["cli"] == "bench" else f"kpeft.{case['cli']}"
    sys.argv = [module, *case["args"]]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_all(cases: list[dict]) -> list[dict]:
    for cli in CLIS:  # import once, before forking (no computation in this process)
        importlib.import_module("kpeft.bench.__main__" if cli == "bench" else f"kpeft.{cli}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            pid = os.fork()
            if pid == 0:
                _child(case, out, err)
            _, status = os.waitpid(pid, 0)
            with open(out) as fo, open(err) as fe:
                results.append({"rc": os.waitstatus_to_exitcode(status), "stdout": fo.read(), "stderr": fe.read()})
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        todo = json.load(f)
    with open(sys.argv[2], "w") as f:
        json.dump(run_all(todo), f)
