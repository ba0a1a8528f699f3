"""Paper tables: their layout (spec), the sweep that fills them, and records → tables.

``spec`` (table layout, runs) · ``sweep`` (which runs a multirun launches; the Hydra sweeper is
``hydra_plugins/kpeft_sweeper``) · ``collect`` (records → values) · ``stats`` (mean ± std, Welch,
paired bootstrap) · ``build`` (bold, significance) · ``render`` (Markdown, LaTeX) · ``figure`` ·
``found`` (tables of whatever records match) · ``own`` (``experiment=NAME`` without a preset).
"""
