"""``python -m kpeft.bench --runs``: whole runs of ``python -m kpeft.train`` against the
``transformers.Trainer`` + PEFT script of :mod:`kpeft.bench.hf_reference`, phase by phase.

Every run is its own process (the startup phase includes the interpreter and the imports), one
torch thread each. Rounds are interleaved: each round runs every (scale, job) pair once on both
sides, the side that goes first alternating, so load drift on a shared machine hits both alike;
ratios are medians over rounds of the paired ratios. Scaling: the same at 1×, 2×, 4× the training
data; the slope of the training phase against the number of training examples (least squares) is
the time per example.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from kpeft.bench import jobs
from kpeft.bench.report import provenance_lines
from kpeft.compose import compose
from kpeft.training.optim import warmup_steps

log = logging.getLogger("kpeft.bench.runs")
PHASES = ("startup", "data", "train", "eval", "scoring")
SIDES = ("kpeft", "hf_trainer")
TARGET_RUN_RATIO, TARGET_PADDING, METRIC_TOLERANCE = 0.9, 0.15, 1.0


@dataclass
class RunOptions:
    jobs: tuple[str, ...] = jobs.JOBS
    scales: tuple[int, ...] = (1, 2, 4)
    rounds: int = 2
    threads: int = 1
    quick: bool = False
    sizes: dict = field(default_factory=dict)

    def size(self, job: str) -> jobs.Sizes:
        return (jobs.QUICK_SIZES if self.quick else jobs.SIZES)[job]


def _spec(job: str, sizes: jobs.Sizes, scale: int, overrides: list[str], data_dir: Path, out_dir: Path,
          threads: int) -> dict:
    """What the reference script needs, read from kpeft's composed config (the same numbers)."""
    cfg = compose(overrides)
    t, lora = cfg.train, cfg.method.components.lora
    n_train = sizes.train * scale
    total = t.epochs * math.ceil(n_train / t.batch_size)
    from kpeft.backbones.loading import model_source

    return {
        "job": job, "kind": "classification" if job == "sst2_minilm" else "generation",
        "model_dir": model_source(cfg.model) if job == "sst2_minilm" else None, "data_dir": str(data_dir),
        "out_dir": str(out_dir), "overrides": overrides, "epochs": t.epochs, "batch": t.batch_size,
        "eval_batch": t.eval_batch_size, "eval": sizes.eval, "lr": t.lr, "weight_decay": t.weight_decay,
        "betas": list(t.adam_betas), "eps": t.adam_eps, "max_grad_norm": t.max_grad_norm,
        "warmup_steps": warmup_steps(t, total), "max_length": cfg.task.max_length, "r": lora.r,
        "alpha": lora.alpha, "dropout": lora.dropout, "seed": cfg.seed, "threads": threads,
        "config": OmegaConf.to_container(cfg.train, resolve=True),
    }


def _launch(argv: list[str], out: Path, threads: int) -> dict:
    """One child process; its phase seconds (and wall), score and extras."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "KPEFT_BENCH_OUT": str(out)}
    env["KPEFT_BENCH_T0"] = repr(time.time())
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rec = json.loads(out.read_text(encoding="utf-8"))
    m, t = rec["marks"], rec["t0"]
    phases = {"startup": m["startup"] - t, "data": m["data"] - m["startup"], "train": m["train"] - m["data"],
              "eval": m["eval_end"] - m["train"] - m["scorer_s"],
              "scoring": m["scorer_s"] + m["scoring"] - m["eval_end"]}
    phases["exit"] = wall - (m["scoring"] - t)  # interpreter teardown (and clock skew, ~0)
    return {"seconds": {**{k: round(v, 3) for k, v in phases.items()}, "wall": round(wall, 3)},
            "score": rec["score"], "extra": rec.get("extra", {})}


def _one(side: str, job: str, scale: int, spec: dict, work: Path) -> dict:
    out = work / f"{side}-{job}-{scale}.json"
    if side == "kpeft":
        return _launch(["-m", "kpeft.bench.child_kpeft", *spec["overrides"]], out, spec["threads"])
    path = work / f"spec-{job}-{scale}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return _launch(["-m", "kpeft.bench.hf_reference", str(path)], out, spec["threads"])


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else math.nan


def _paired(pick: dict, rounds: int, scale: int, key: str) -> float:
    """Median over rounds of kpeft's / the reference's seconds of `key` at `scale` (same round)."""
    return _median([pick["kpeft", scale, k]["seconds"][key] / pick["hf_trainer", scale, k]["seconds"][key]
                    for k in range(rounds) if pick["hf_trainer", scale, k]["seconds"][key] > 0])


def measure(opts: RunOptions, work: Path) -> list[dict]:
    """Every run, in interleaved rounds; one row per run."""
    specs = {}
    for job in opts.jobs:
        sizes = opts.size(job)
        for scale in opts.scales:
            data = jobs.sst2_data(work / f"sst2-{scale}", sizes.train * scale, sizes.eval) if job == "sst2_minilm" \
                else jobs.WEBNLG
            overrides = jobs.kpeft_overrides(job, sizes, scale, data, work / "runs")
            specs[job, scale] = _spec(job, sizes, scale, overrides, data, work / f"hf-{job}-{scale}", opts.threads)
    rows = []
    for rnd in range(opts.rounds):
        for scale in opts.scales:
            for job in opts.jobs:
                sides = SIDES if (rnd + scale) % 2 == 0 else SIDES[::-1]
                for side in sides:
                    log.info("round %d/%d: %s %s %d×", rnd + 1, opts.rounds, side, job, scale)
                    res = _one(side, job, scale, specs[job, scale], work)
                    rows.append({"round": rnd, "side": side, "job": job, "scale": scale,
                                 "n_train": opts.size(job).train * scale, **res})
    return rows


def summarise(rows: list[dict], opts: RunOptions) -> dict:
    """Ratios (median over rounds of kpeft / reference), metrics, scaling and padding."""
    out: dict = {"run_ratio_vs_hf_trainer": {}, "phase_ratio_vs_hf_trainer": {}, "final_metric": {},
                 "padding_fraction": {}, "scaling": {}, "seconds": {}}
    first = opts.scales[0]
    for job in opts.jobs:
        pick = {(r["side"], r["scale"], r["round"]): r for r in rows if r["job"] == job}
        paired = functools.partial(_paired, pick, opts.rounds)

        out["run_ratio_vs_hf_trainer"][job] = round(paired(first, "wall"), 3)
        out["phase_ratio_vs_hf_trainer"][job] = {p: round(paired(first, p), 3) for p in PHASES}
        out["run_ratio_by_scale"] = {**out.get("run_ratio_by_scale", {}),
                                     job: {f"{s}x": round(paired(s, "wall"), 3) for s in opts.scales}}
        out["final_metric"][job] = {
            side: round(_median([pick[side, first, k]["score"] for k in range(opts.rounds)]), 2) for side in SIDES}
        out["final_metric"][job]["metric"] = "accuracy" if job == "sst2_minilm" else "bleu_all"
        out["final_metric"][job]["by_scale"] = {
            f"{s}x": {side: round(_median([pick[side, s, k]["score"] for k in range(opts.rounds)]), 2) for side in SIDES}
            for s in opts.scales}
        extra = pick["kpeft", first, 0]["extra"]
        out["padding_fraction"][job] = {"kpeft": extra.get("padding_fraction"),
                                        "without_grouping": extra.get("padding_fraction_ungrouped"),
                                        "group_by_length": extra.get("group_by_length")}
        scaling, secs = {}, {}
        for side in SIDES:
            n = [opts.size(job).train * s for s in opts.scales]
            train = [_median([pick[side, s, k]["seconds"]["train"] for k in range(opts.rounds)]) for s in opts.scales]
            wall = [_median([pick[side, s, k]["seconds"]["wall"] for k in range(opts.rounds)]) for s in opts.scales]
            scaling[side] = {
                "train_s_per_example": {f"{s}x": round(t / x, 5) for s, t, x in zip(opts.scales, train, n)},
                "train_slope_s_per_example": round(_slope(n, train), 5) if len(n) > 1 else None,
                "wall_slope_s_per_example": round(_slope(n, wall), 5) if len(n) > 1 else None,
            }
            secs[side] = {f"{s}x": {p: round(_median([pick[side, s, k]["seconds"][p] for k in range(opts.rounds)]), 3)
                                    for p in (*PHASES, "exit", "wall")} for s in opts.scales}
        out["scaling"][job], out["seconds"][job] = scaling, secs
    out["targets"] = targets(out, opts)
    return out


def targets(res: dict, opts: RunOptions) -> dict:
    """Issue 20's targets: ratio ≤ 0.9, metrics within 1 point, per-example time not rising, padding ≤ 15%."""
    t = {}
    for job in opts.jobs:
        ratio = res["run_ratio_vs_hf_trainer"][job]
        t[f"run_ratio_vs_hf_trainer.{job}"] = {"value": ratio, "target": f"<= {TARGET_RUN_RATIO}",
                                                "met": ratio <= TARGET_RUN_RATIO}
        fm = res["final_metric"][job]
        diff = round(fm["kpeft"] - fm["hf_trainer"], 2)
        t[f"final_metric_diff.{job}"] = {"value": diff, "target": f"|d| <= {METRIC_TOLERANCE}",
                                         "met": abs(diff) <= METRIC_TOLERANCE}
        per = res["scaling"][job]["kpeft"]["train_s_per_example"]
        if len(per) > 1:
            a, b = per[f"{opts.scales[0]}x"], per[f"{opts.scales[-1]}x"]
            t[f"train_s_per_example_growth.{job}"] = {"value": round(b / a, 3), "target": "<= 1.1 (flat or falling)",
                                                      "met": b / a <= 1.1}
        pad = res["padding_fraction"][job]["kpeft"]
        if job != "sst2_minilm" and pad is not None:
            t[f"padding_fraction.{job}"] = {"value": pad, "target": f"<= {TARGET_PADDING}", "met": pad <= TARGET_PADDING}
    return t


def run_all(opts: RunOptions, work: Path | None = None) -> dict:
    """Measure and summarise; the result dict (rows included)."""
    import platform

    import peft
    import torch
    import transformers

    t0, load_start = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kpeft-bench-runs-") as tmp:
        rows = measure(opts, Path(work or tmp))
    res = summarise(rows, opts)
    res["rows"] = rows
    res["setup"] = {
        "jobs": {j: vars(opts.size(j)) for j in opts.jobs}, "scales": list(opts.scales), "rounds": opts.rounds,
        "threads": opts.threads, "quick": opts.quick, "wall_s": round(time.perf_counter() - t0, 1),
        "host_kind": f"cpu-{opts.threads}t", "cpu_count": os.cpu_count(),
        "load_avg_1_5_15min": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
    }
    res["targets_met"] = all(v["met"] for v in res["targets"].values())
    return res


def markdown(res: dict) -> str:
    """The record as Markdown: per job the phase seconds and ratios, metrics, scaling, padding."""
    s = res["setup"]
    first = f"{s['scales'][0]}x"
    lines = [f"Whole runs, `python -m kpeft.train` vs `transformers.Trainer` + PEFT LoRA ({s['rounds']} interleaved "
             f"round(s), {s['threads']} thread(s) per run, medians; ratios = kpeft / Trainer).", ""]
    for job, ratio in res["run_ratio_vs_hf_trainer"].items():
        secs = res["seconds"][job]
        lines += [f"**{job}** ({s['jobs'][job]['train']} training examples at 1×): whole run **{ratio:.2f}×**", "",
                  "| phase | kpeft s | Trainer s | ratio |", "|---|---|---|---|"]
        for p in (*PHASES, "wall"):
            r = res["phase_ratio_vs_hf_trainer"][job].get(p, ratio)
            lines.append(f"| {p} | {secs['kpeft'][first][p]:.2f} | {secs['hf_trainer'][first][p]:.2f} | {r:.2f} |")
        fm, pad = res["final_metric"][job], res["padding_fraction"][job]
        sc = res["scaling"][job]
        lines += ["", f"{fm['metric']}: kpeft {fm['kpeft']:.2f}, Trainer {fm['hf_trainer']:.2f}; "
                  f"training padding {pad['kpeft']:.1%} (group_by_length={pad['group_by_length']}; "
                  f"{pad['without_grouping']:.1%} without); whole-run ratio by scale: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in res["run_ratio_by_scale"][job].items()) + ".",
                  "Training time per example: " + "; ".join(
                      f"{side} " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in sc[side]['train_s_per_example'].items())
                      + (f" (slope {sc[side]['train_slope_s_per_example'] * 1000:.1f} ms)"
                         if sc[side]['train_slope_s_per_example'] is not None else "")
                      for side in SIDES) + ".", ""]
    if s.get("note"):
        lines += [f"Note: {s['note']}", ""]
    missed = [k for k, v in res["targets"].items() if not v["met"]]
    lines.append(f"Targets met: {len(res['targets']) - len(missed)} of {len(res['targets'])}"
                 + (f"; missed: {', '.join(missed)}." if missed else "."))
    lines += provenance_lines(res)
    return "\n".join(lines)
