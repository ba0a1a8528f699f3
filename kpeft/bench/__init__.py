"""``python -m kpeft.bench``: speed and memory of every method, as ratios measured in one process.

On one random-init backbone (GPT-2 small by default) and one batch, with warm-up and interleaved
repeats (medians): training step time over PEFT's LoRA-54, peak memory over full fine-tuning,
inference latency over the plain backbone (merged and unmerged), KronA's Table 2 layout
(full fine-tuning = 100), greedy decoding throughput against a naive loop and against
transformers' ``generate``, and KronA's reshape product against the materialised Kronecker matrix.

Modules: :mod:`~kpeft.bench.zoo` (the models, sharing frozen weights), :mod:`~kpeft.bench.timing`
(clocks, repeats, peak memory), :mod:`~kpeft.bench.measure` (the measurements),
:mod:`~kpeft.bench.report` (ratios, targets, Markdown), :mod:`~kpeft.bench.run` (one run).
"""

from kpeft.bench.run import QUICK, Options, run

__all__ = ["Options", "QUICK", "run"]
