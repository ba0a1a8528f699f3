"""Official metrics, one module per benchmark (docs/benchmarks.md): each reproduces the numbers of the scorer
the papers ran, not an approximation of them.

* :mod:`kpeft.metrics.webnlg` — WebNLG 2017 challenge BLEU / METEOR 1.5 / TER on SEEN, UNSEEN, ALL;
* :mod:`kpeft.metrics.coqa` — CoQA ``evaluate-v1.0`` EM / F1 (leave-one-out over gold answers);
* :mod:`kpeft.metrics.rouge` — ROUGE-1/2/L/Lsum (``rouge-score``) and the Kernel-mix code's
  set-based ``rouge2_vglm``;
* :mod:`kpeft.metrics.glue` — accuracy, Matthews correlation, F1, Pearson / Spearman.

Modules import their third-party scorers lazily, so importing one metric never needs the others.
"""
