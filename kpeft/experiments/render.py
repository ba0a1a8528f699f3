"""A built table as Markdown and as LaTeX (booktabs), in the papers' layout: methods grouped by
budget, the trained / stored parameter columns, then each task's metric columns."""

from __future__ import annotations

from kpeft.experiments.build import ALPHA, CellView, ColumnView, TableView

DASH = "—"


def _pct(value: float | None) -> str:
    if value is None:
        return DASH
    return "100" if round(value, 2) == 100 else f"{value:.2f}"


def _number(cell: CellView, column: ColumnView) -> str:
    d = column.column.digits
    s = cell.summary
    if s.n > 1 and column.task != "avg":
        return f"{s.mean:.{d}f} ± {s.std:.{d}f}"
    return f"{s.mean:.{d}f}"


def _count(cell: CellView) -> str:
    """``(found/asked[, k failed])`` when some runs are missing."""
    found = cell.summary.n if cell.summary else 0
    if found >= cell.expected:
        return ""
    failed = f", {cell.failed} failed" if cell.failed else ""
    return f"({found}/{cell.expected}{failed})"


def legend(table: TableView, n_boot: int = 1000) -> list[str]:
    if not any(row.baseline for row in table.rows):
        return ["Mean ± standard deviation over seeds; (k/n): only k of the n runs asked for have a record; "
                f"{DASH}: none. Bold: the best mean of its group. No significance marks: no row is a "
                "baseline (name one with --baseline, e.g. --baseline lora)."]
    return [
        "Mean ± standard deviation over seeds; (k/n): only k of the n runs asked for have a record; "
        f"{DASH}: none. Bold: the best mean of its budget group.",
        f"* Welch's t-test over seeds against the best baseline of the group (two-sided; the best "
        f"baseline itself has no mark): p < {ALPHA}. "
        f"† paired bootstrap over test examples ({n_boot} resamples, per-example scores averaged over "
        f"seeds) against the same baseline: p < {ALPHA}.",
    ] + (["‡ the cell's runs differ in configuration (the keys are listed below the table)."]
         if table.differs else [])


def _headers(table: TableView) -> tuple[list[str], list[str]]:
    tasks = [c.task_label for c in table.columns]
    cols = [c.column.label or c.column.metric for c in table.columns]
    return tasks, cols


def markdown(table: TableView, n_boot: int = 1000) -> str:
    spec = table.spec
    title = spec.title or "table"
    lines = [f"## {title}" + (f" ({spec.source})" if spec.source else ""), "",
             f"Model `{table.model}`, split `{spec.split}`; built from the run records only.", ""]
    tasks, cols = _headers(table)
    head = ["Budget", "Method", "Train %", "Store %"]
    head += [f"{t} {c}" if t != c else t for t, c in zip(tasks, cols)]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    previous = None
    for row in table.rows:
        group = row.group if row.group != previous else ""
        previous = row.group
        cells = [group, row.label, _pct(row.train_pct), _pct(row.store_pct)]
        for cell, col in zip(row.cells, table.columns):
            if cell.summary is None:
                cells.append(" ".join(x for x in (DASH, _count(cell)) if x))
                continue
            text = _number(cell, col)
            text = f"**{text}**" if cell.bold else text
            cells.append(" ".join(x for x in (text + cell.marks.replace("*", "\\*"), _count(cell)) if x))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [ln.replace("*", "\\*") + "  " for ln in legend(table, n_boot)]
    if spec.note:
        lines += ["", spec.note]
    lines += ["", _status(table)]
    if table.missing:
        lines += ["", "<details><summary>runs without a complete record</summary>", ""]
        lines += [f"- {m}" for m in table.missing]
        lines += ["", "</details>"]
    if table.failed:
        lines += ["", "Failed runs (their records hold the traceback; re-running the sweep retries them):", ""]
        lines += [f"- {f}" for f in table.failed]
    return "\n".join(lines) + "\n"


def _status(table: TableView) -> str:
    found = table.expected - len(table.missing)
    text = f"Runs: {found} of {table.expected} have a complete record"
    if table.failed:
        text += f"; {len(table.failed)} failed"
    if table.ignored:
        text += (f"; {table.ignored} complete records ignored (their config lacks the row's overrides, "
                 "or another config of the same run was chosen)")
    if table.differs:
        text += "; ‡ configs differ within a cell: " + "; ".join(table.differs)
    for line in table.made_by:  # records of different code or environments (docs/reproduce.md)
        text += f"; {line}"
    return text + "."


# ---------------------------------------------------------------- LaTeX
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text).replace("—", "---").replace("±", r"$\pm$")


def _tex_cell(cell: CellView, col: ColumnView) -> str:
    if cell.summary is None:
        count = _count(cell)
        return "---" + (f" {{\\scriptsize {tex_escape(count)}}}" if count else "")
    d = col.column.digits
    s = cell.summary
    mean = f"{s.mean:.{d}f}"
    mean = rf"\textbf{{{mean}}}" if cell.bold else mean
    text = mean + (rf"$\pm${s.std:.{d}f}" if s.n > 1 and col.task != "avg" else "")
    marks = cell.marks.replace("†", r"\dagger").replace("‡", r"\ddagger")
    if marks:
        text += f"$^{{{marks}}}$"
    count = _count(cell)
    return text + (f" {{\\scriptsize {tex_escape(count)}}}" if count else "")


def latex(table: TableView, n_boot: int = 1000) -> str:
    spec = table.spec
    n = len(table.columns)
    lines = [r"% Generated by python -m kpeft.tables from the run records; needs \usepackage{booktabs}.",
             r"\begin{table*}[t]", r"\centering", r"\small",
             r"\begin{tabular}{ll" + "rr" + "r" * n + "}", r"\toprule"]
    # Task header with \cmidrule under each task's columns.
    spans: list[tuple[str, int, int]] = []
    for i, col in enumerate(table.columns):
        if spans and spans[-1][0] == col.task_label:
            spans[-1] = (spans[-1][0], spans[-1][1], i)
        else:
            spans.append((col.task_label, i, i))
    top = [" ", " ", r"\multicolumn{2}{c}{Params (\%)}"]
    rules = [r"\cmidrule(lr){3-4}"]
    for label, a, b in spans:
        top.append(rf"\multicolumn{{{b - a + 1}}}{{c}}{{{tex_escape(label)}}}")
        rules.append(rf"\cmidrule(lr){{{a + 5}-{b + 5}}}")
    lines.append(" & ".join(top) + r" \\")
    lines.append("".join(rules))
    sub = ["Budget", "Method", "Train", "Store"] + [tex_escape(c.column.label or c.column.metric) for c in table.columns]
    lines.append(" & ".join(sub) + r" \\")
    previous = None
    for row in table.rows:
        if row.group != previous:
            lines.append(r"\midrule")
        group = tex_escape(row.group) if row.group != previous else ""
        previous = row.group
        cells = [group, tex_escape(row.label), tex_escape(_pct(row.train_pct)), tex_escape(_pct(row.store_pct))]
        cells += [_tex_cell(c, col) for c, col in zip(row.cells, table.columns)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = tex_escape(f"{spec.title} ({spec.source})." if spec.source else f"{spec.title}.")
    caption += " " + tex_escape(" ".join(legend(table, n_boot))).replace("†", r"$^\dagger$").replace("‡", r"$^\ddagger$")
    status = tex_escape(_status(table)).replace("‡", r"$^\ddagger$")
    lines += [rf"\caption{{{caption} {status}}}", r"\end{table*}"]
    return "\n".join(lines) + "\n"
