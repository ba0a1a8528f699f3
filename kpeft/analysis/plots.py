"""PNG figures of the analyses (matplotlib's object API: no display, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def similarity_heatmaps(panels: list[tuple[str, np.ndarray]], path: Path, labels: tuple[str, str]) -> Path:
    """LoRA Figure 3: one heat map of ``φ(i, j)`` per (layer, matrix), i down, j across, in [0, 1]."""
    rows, cols = _grid(len(panels))
    fig = Figure(figsize=(3.2 * cols + 0.8, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, (title, phi) in zip(axes, panels):
        image = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                          extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"i ({labels[0]})", fontsize=8)
        ax.set_xlabel(f"j ({labels[1]})", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(panels)]), shrink=0.8, label="φ(i, j)")
    fig.savefig(path, dpi=120)
    return path


def head_norm_figure(
    norms: dict[str, np.ndarray], totals: dict[str, np.ndarray], layers: dict[str, list[int]], path: Path
) -> Path:
    """Per matrix, a (layer × head) heat map of ``‖ΔW^(h)‖_F``; and per layer the ``‖ΔW‖_F`` of
    each matrix side by side (how the budget is split across heads and across W_q / W_v / W_o).
    ``layers[name]`` are the layer indices of the rows of ``norms[name]`` and ``totals[name]``."""
    names = list(norms)
    fig = Figure(figsize=(3.4 * (len(names) + 1), 3.2), layout="constrained")
    axes = fig.subplots(1, len(names) + 1, squeeze=False)[0]
    vmax = max(float(np.nanmax(v)) for v in norms.values()) or 1.0
    image = None
    for ax, name in zip(axes, names):
        image = ax.imshow(norms[name], vmin=0.0, vmax=vmax, cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_title(f"W_{name}: ‖ΔW‖_F of each head", fontsize=9)
        ax.set_yticks(range(len(layers[name])), [str(i) for i in layers[name]])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(names)]), shrink=0.8)
    ax = axes[-1]
    width = 0.8 / max(len(totals), 1)
    for k, (name, values) in enumerate(totals.items()):
        ax.bar(np.asarray(layers[name]) + (k - (len(totals) - 1) / 2) * width, values, width=width, label=f"W_{name}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer", fontsize=8)
    ax.set_title("‖ΔW‖_F per matrix", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path
