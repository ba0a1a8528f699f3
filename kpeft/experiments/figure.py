"""One figure per table: per task (its headline column) a dot per row — mean ± standard deviation
over seeds, labelled with the row and its trained-parameter percentage, one colour per budget
group, baselines as open markers. Rows run down the y axis, so labels never collide however many
rows there are: the figure's height follows the row count and its margin the longest label."""

from __future__ import annotations

import textwrap
from pathlib import Path

from kpeft.experiments.build import RowView, TableView

WRAP = 32  # characters per label line


def row_label(row: RowView, groups: int) -> str:
    text = row.label + (f" ({row.group})" if groups > 1 else "")
    if row.train_pct is not None:
        text += f", {row.train_pct:.2g}%" if row.train_pct < 10 else f", {row.train_pct:.0f}%"
    return textwrap.fill(text, WRAP)


def plot(table: TableView, path: Path) -> Path | None:
    """Write the PNG; None when no row has a score."""
    import matplotlib.pyplot as plt

    fig = draw(table)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw(table: TableView):
    """The matplotlib Figure (None when no row has a score); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    firsts: dict[str, int] = {}
    for i, col in enumerate(table.columns):
        if col.task != "avg":
            firsts.setdefault(col.task, i)
    panels = [(table.columns[i], i) for i in firsts.values()]
    if not any(r.cells[i].summary for r in table.rows for _, i in panels):
        return None
    groups = list(dict.fromkeys(r.group for r in table.rows))
    colours = {g: plt.get_cmap("tab10")(k % 10) for k, g in enumerate(groups)}
    labels = [row_label(r, len(groups)) for r in table.rows]
    lines = sum(label.count("\n") + 1 for label in labels)
    height = 1.4 + 0.28 * lines + 0.12 * len(labels)
    width = 3.2 + 0.075 * max(len(line) for label in labels for line in label.splitlines())
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    ys = list(range(len(table.rows)))[::-1]  # first row on top
    for k, (ax, (col, i)) in enumerate(zip(axes[0], panels)):
        for y, row in zip(ys, table.rows):
            s = row.cells[i].summary
            if s is None:
                continue
            ax.errorbar(s.mean, y, xerr=s.std if s.n > 1 else None, fmt="o", capsize=3, color=colours[row.group],
                        markerfacecolor="white" if row.baseline else colours[row.group])
        ax.set_yticks(ys)
        ax.set_yticklabels(labels if k == 0 else [""] * len(labels), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel(f"{col.task_label} {col.column.label or col.column.metric}", fontsize=8)
        ax.set_ylim(-0.6, len(table.rows) - 0.4)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    title = table.spec.title + (f" ({table.spec.source})" if table.spec.source else "")
    fig.suptitle(textwrap.fill(f"{title}; mean ± std over seeds; open markers: baselines", 40 + int(12 * width)),
                 fontsize=9)
    fig.tight_layout()
    return fig
