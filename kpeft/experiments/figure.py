"""One figure per table: each task's headline score against the trained-parameter percentage
(log scale), mean ± standard deviation over seeds, one colour per budget group."""

from __future__ import annotations

from pathlib import Path

from kpeft.experiments.build import TableView


def plot(table: TableView, path: Path) -> Path | None:
    """Write the PNG; None when no row has both a score and a parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts = {}
    for i, col in enumerate(table.columns):
        if col.task != "avg":
            firsts.setdefault(col.task, i)
    panels = [(table.columns[i], i) for i in firsts.values()]
    points = [[(r, r.cells[i]) for r in table.rows if r.cells[i].summary and r.train_pct] for _, i in panels]
    if not any(points):
        return None
    groups = list(dict.fromkeys(r.group for r in table.rows))
    colours = {g: plt.get_cmap("tab10")(k % 10) for k, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (col, _), pts in zip(axes[0], panels, points):
        seen = set()
        for k, (row, cell) in enumerate(pts):
            s = cell.summary
            label = row.group if row.group not in seen else None
            seen.add(row.group)
            ax.errorbar(row.train_pct, s.mean, yerr=s.std if s.n > 1 else None, fmt="o", capsize=3,
                        color=colours[row.group], label=label, markerfacecolor="white" if row.baseline else None)
            ax.annotate(row.label, (row.train_pct, s.mean), textcoords="offset points",
                        xytext=(4, 3 if k % 2 == 0 else -9), fontsize=7)  # alternate: fewer overlaps
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters (% of the backbone)")
        ax.set_ylabel(f"{col.task_label} {col.column.label or col.column.metric}")
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=7, title="budget", title_fontsize=7)
    title = table.spec.title + (f" ({table.spec.source})" if table.spec.source else "")
    fig.suptitle(f"{title}; open markers: baselines", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
