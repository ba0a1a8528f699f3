"""``python -m kpeft.analyze {similarity,amplification,heads} RUN … [--layer N] [--matrix q v] [--out DIR]``

Analyses of saved adapters (a run directory's ``checkpoints/best``, or a checkpoint directory).
ΔW is always the method's own merge formula (the branches' ``delta_weight()``). Each command prints
a table, then one JSON object as its last stdout line, and writes its PNG into ``RUN/analysis/``
(or ``--out``):

* ``similarity RUN_A RUN_B`` — LoRA §7.2, Eq. 4: ``φ(i, j) = ‖U_Aᵀ_i U_B_j‖²_F / min(i, j)`` between the
  top-i / top-j right-singular directions of the two adapters' ``A`` matrices (``--basis delta``: the
  input-side singular directions of ΔW, for any method); ``similarity.png`` like LoRA's Figure 3.
* ``amplification RUN`` — LoRA §7.3, Table 7: ``‖ΔW‖_F``, ``‖Uᵀ W V‖_F`` for U, V the top-r singular
  vectors of ΔW, of W and of a random Gaussian matrix, and ``‖ΔW‖_F / ‖Uᵀ W V‖_F``.
* ``heads RUN`` — the kernel view: ``‖ΔW^(h)‖_F`` of every head's block (columns of W_q/W_k/W_v,
  rows of W_o), each head's share of ``‖ΔW‖²_F``, the split across W_q / W_v / W_o and between
  shared and head-specific branches, and each head's amplification; ``heads.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kpeft.analysis.plots import head_norm_figure, similarity_heatmaps
from kpeft.analysis.subspace import (
    amplification,
    head_blocks,
    head_norms,
    input_basis,
    right_singular_basis,
    subspace_similarity,
)
from kpeft.analysis.updates import MatrixUpdate, load_run, weight_updates
from kpeft.errors import ArgumentParser, KpeftError, user_errors

MAX_PANELS = 48


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m kpeft.analyze", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--layer", type=int, action="append", help="layer index (repeatable; default: all)")
    common.add_argument("--matrix", nargs="+", choices=["q", "k", "v", "o"], help="default: every adapted one")
    common.add_argument("--attention", default="all", choices=["self", "cross", "all"])
    common.add_argument("--out", type=Path, help="where PNGs go (default: RUN/analysis)")
    sim = sub.add_parser("similarity", parents=[common], help="LoRA subspace similarity of two adapters")
    sim.add_argument("run_a")
    sim.add_argument("run_b")
    sim.add_argument("--basis", default="auto", choices=["auto", "A", "delta"],
                     help="A: LoRA's A matrices (the paper); delta: ΔW's input side; auto: A where both are LoRA")
    amp = sub.add_parser("amplification", parents=[common], help="LoRA Table 7 amplification factors")
    amp.add_argument("run")
    amp.add_argument("--rank", type=int, help="r (default: the numerical rank of ΔW)")
    amp.add_argument("--seed", type=int, default=0, help="seed of the random control")
    heads = sub.add_parser("heads", parents=[common], help="per-head update norms (kernel view)")
    heads.add_argument("run")
    heads.add_argument("--seed", type=int, default=0, help="seed of the random control")
    return parser


def _updates(run: str, args) -> list[MatrixUpdate]:
    _, adapted = load_run(run)
    ups = [u for u in weight_updates(adapted, args.attention)
           if (args.layer is None or u.layer in args.layer) and (args.matrix is None or u.matrix in args.matrix)]
    if not ups:
        raise KpeftError(f"'{run}': no adapted attention matrix matches --layer {args.layer} --matrix {args.matrix} "
                         f"--attention {args.attention} (the method may have no weight-site branches)")
    return ups


def _out_dir(args, run: str) -> Path:
    out = args.out or Path(run) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _label(u: MatrixUpdate) -> str:
    return f"layer {u.layer} {u.attention} W_{u.matrix}"


# ---------------------------------------------------------------- commands
def similarity(args) -> dict[str, Any]:
    a = {u.key: u for u in _updates(args.run_a, args)}
    b = {u.key: u for u in _updates(args.run_b, args)}
    keys = [k for k in a if k in b]
    if not keys:
        raise KpeftError("the two runs share no adapted matrix (same layers, attention and q/k/v/o)")
    pairs, panels = [], []
    for key in keys:
        ua, ub = a[key], b[key]
        basis = args.basis
        if basis == "auto":
            basis = "A" if ua.lora_a() is not None and ub.lora_a() is not None else "delta"
        if basis == "A":
            if ua.lora_a() is None or ub.lora_a() is None:
                raise KpeftError(f"{_label(ua)}: --basis A needs one LoRA branch on the matrix in both runs; use --basis delta")
            u1, u2 = right_singular_basis(ua.lora_a()), right_singular_basis(ub.lora_a())
        else:
            u1, u2 = input_basis(ua.delta), input_basis(ub.delta)
        phi = subspace_similarity(u1, u2)
        pairs.append({"layer": ua.layer, "attention": ua.attention, "matrix": ua.matrix, "basis": basis,
                      "r_a": u1.shape[1], "r_b": u2.shape[1],
                      "phi_1_1": float(phi[0, 0]) if phi.numel() else None,
                      "phi": np.round(phi.numpy(), 6).tolist()})
        panels.append((_label(ua), phi.numpy()))
    out = _out_dir(args, args.run_a)
    png = similarity_heatmaps(panels[:MAX_PANELS], out / "similarity.png", ("A", "B"))
    return {"command": "similarity", "run_a": str(args.run_a), "run_b": str(args.run_b), "pairs": pairs, "png": str(png)}


def amplification_report(args) -> dict[str, Any]:
    rows = []
    for u in _updates(args.run, args):
        rows.append({"layer": u.layer, "attention": u.attention, "matrix": u.matrix,
                     **{k: _finite(v) for k, v in amplification(u.weight, u.delta, args.rank, args.seed).items()}})
    return {"command": "amplification", "run": str(args.run), "matrices": rows}


def heads(args) -> dict[str, Any]:
    ups = _updates(args.run, args)
    rows, norms, totals, layers = [], {}, {}, {}
    for u in ups:
        hn = head_norms(u.delta, u.heads, u.head_axis)
        total = float(torch.linalg.matrix_norm(u.delta.double()))
        per_head = [
            {k: _finite(v) for k, v in amplification(w, d, None, args.seed).items()}
            for w, d in zip(head_blocks(u.weight, u.heads, u.head_axis), head_blocks(u.delta, u.heads, u.head_axis))
        ]
        rows.append({"layer": u.layer, "attention": u.attention, "matrix": u.matrix, "heads": u.heads,
                     "norm": total, "head_norms": hn.tolist(),
                     "head_share": (hn**2 / total**2).tolist() if total > 0 else [0.0] * u.heads,
                     "branch_norms": u.branch_norms(), "head_amplification": per_head})
        name = u.matrix if u.attention == "self" else f"{u.matrix}_cross"
        norms.setdefault(name, []).append(hn.numpy())
        totals.setdefault(name, []).append(total)
        layers.setdefault(name, []).append(u.layer)
    squares = {name: float(np.sum(np.square(v))) for name, v in totals.items()}
    overall = sum(squares.values()) or 1.0
    out = _out_dir(args, args.run)
    png = head_norm_figure({k: np.stack(v) for k, v in norms.items()}, {k: np.array(v) for k, v in totals.items()},
                           layers, out / "heads.png")
    return {"command": "heads", "run": str(args.run), "matrices": rows,
            "matrix_share": {name: sq / overall for name, sq in squares.items()}, "png": str(png)}


COMMANDS = {"similarity": similarity, "amplification": amplification_report, "heads": heads}


# ---------------------------------------------------------------- output
def format_table(result: dict[str, Any]) -> str:
    """The human-readable lines printed before the JSON."""
    cmd = result["command"]
    lines = []
    if cmd == "similarity":
        lines.append(f"{'layer':>5} {'att':<5} {'W':<2} {'basis':<6} {'r_A':>4} {'r_B':>4} {'φ(1,1)':>8} {'φ(r_A,r_B)':>10}")
        for p in result["pairs"]:
            last = p["phi"][-1][-1] if p["phi"] else float("nan")
            lines.append(f"{p['layer']:>5} {p['attention']:<5} {p['matrix']:<2} {p['basis']:<6} {p['r_a']:>4} "
                         f"{p['r_b']:>4} {p['phi_1_1'] or 0:>8.4f} {last:>10.4f}")
    elif cmd == "amplification":
        lines.append(f"{'layer':>5} {'att':<5} {'W':<2} {'r':>4} {'‖ΔW‖':>9} {'‖W‖':>9} {'UᵀWV:ΔW':>9} "
                     f"{'UᵀWV:W':>9} {'UᵀWV:rnd':>9} {'amplif.':>9}")
        for m in result["matrices"]:
            amp = m["amplification"]
            lines.append(f"{m['layer']:>5} {m['attention']:<5} {m['matrix']:<2} {m['r']:>4} {m['delta_norm']:>9.4g} "
                         f"{m['w_norm']:>9.4g} {m['proj_delta']:>9.4g} {m['proj_w']:>9.4g} {m['proj_random']:>9.4g} "
                         f"{'inf' if amp is None else format(amp, '.4g'):>9}")
    else:
        lines.append(f"{'layer':>5} {'att':<5} {'W':<2} {'‖ΔW‖':>9}  per-head ‖ΔW^(h)‖")
        for m in result["matrices"]:
            lines.append(f"{m['layer']:>5} {m['attention']:<5} {m['matrix']:<2} {m['norm']:>9.4g}  "
                         + " ".join(f"{x:.3g}" for x in m["head_norms"]))
        lines.append("share of Σ‖ΔW‖²: " + ", ".join(f"W_{k} {v:.1%}" for k, v in result["matrix_share"].items()))
    if "png" in result:
        lines.append(f"figure: {result['png']}")
    return "\n".join(lines)


@user_errors
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    with torch.no_grad():
        result = COMMANDS[args.command](args)
    print(format_table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
