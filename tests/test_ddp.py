"""Data-parallel training: 2 CPU processes (gloo) equal 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kpeft.records import read_record

NO_DROPOUT = ("+model.architecture.resid_pdrop=0", "+model.architecture.embd_pdrop=0",
              "+model.architecture.attn_pdrop=0")
ARGS = ("model=tiny_gpt2", "task=demo_reverse", "train.epochs=2", "train.batch_size=32",
        "train.progress=false", *NO_DROPOUT)


def _train(root, launcher: list[str], method: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodrop = ["method.components.lora.dropout=0"] if method == "lora" else []
    cmd = [*launcher, "-m", "kpeft.train", *ARGS, *nodrop, f"method={method}", f"output_root={root}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = read_record(next(root.glob("**/record.json")))
    return rec


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "lora"])
def test_two_process_ddp_matches_one_process(tmp_path, method):
    single = _train(tmp_path / "one", [sys.executable], method)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    ddp = _train(tmp_path / "two", torchrun, method)
    assert single["training"]["world_size"] == 1 and ddp["training"]["world_size"] == 2
    assert ddp["training"]["steps"] == single["training"]["steps"]
    a = load_file(f"{single['run_dir']}/checkpoints/best/adapter.safetensors")
    b = load_file(f"{ddp['run_dir']}/checkpoints/best/adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert ddp["metrics"]["test"]["loss"] == pytest.approx(single["metrics"]["test"]["loss"], rel=1e-5)
    assert ddp["metrics"]["test"]["accuracy"] == pytest.approx(single["metrics"]["test"]["accuracy"], abs=0.5)
