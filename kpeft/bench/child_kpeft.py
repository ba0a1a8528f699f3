"""``python -m kpeft.bench.child_kpeft <kpeft.train overrides>``: ``python -m kpeft.train`` itself,
with clocks at its phase boundaries (one process of ``kpeft.bench --runs``).

The phases end at: the adapted model built (startup: interpreter, imports, composition, model),
the splits encoded (data), ``Trainer.fit`` (train, with the per-epoch validation loss and the best
checkpoint), the final ``Trainer.evaluate`` less the scorer (eval: predictions or decoding, the
test loss), the scorer and the record (scoring). ``KPEFT_BENCH_T0`` is the parent's
``time.time()`` just before it started this process; the marks go to ``KPEFT_BENCH_OUT`` (JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = float(os.environ.get("KPEFT_BENCH_T0", time.time()))
import kpeft.train as kt  # noqa: E402  (its import time is part of the startup phase)
from kpeft.training.data import epoch_order, padding_fraction  # noqa: E402
from kpeft.training.loop import Trainer  # noqa: E402

marks: dict[str, float] = {}
score_s = [0.0]
record: dict = {}
extra: dict = {}


def _timed_build(cfg):
    adapted, task = kt.build_model(cfg)
    marks["startup"] = time.time()
    splits = task.load_splits()
    marks["data"] = time.time()
    scorer = getattr(task, "score_generations", None)  # timed separately: the "scoring" phase
    if scorer is not None:

        def timed_score(*args, **kwargs):
            t = time.perf_counter()
            try:
                return scorer(*args, **kwargs)
            finally:
                score_s[0] += time.perf_counter() - t

        task.score_generations = timed_score
    return adapted, task, splits


def _patch() -> None:
    fit, evaluate, run = Trainer.fit, Trainer.evaluate, kt.run

    def timed_fit(self):
        state = fit(self)
        marks["train"] = time.time()
        lengths = [len(e["input_ids"]) for e in self.splits["train"]]
        extra.update(group_by_length=self.group_by_length, padding_fraction=round(self.padding_fraction(), 4),
                     padding_fraction_ungrouped=round(padding_fraction(
                         lengths, epoch_order(len(lengths), self.cfg.seed, 0), self.tcfg.batch_size), 4))
        return state

    def timed_evaluate(self, *args, **kwargs):
        before = score_s[0]
        out = evaluate(self, *args, **kwargs)
        if "train" in marks:  # the final evaluation (not eval_before_training)
            marks["eval_end"] = time.time()
            marks["scorer_s"] = score_s[0] - before
        return out

    def timed_run(cfg):
        rec = run(cfg)
        marks["scoring"] = time.time()
        record.update(rec)
        return rec

    kt.build, Trainer.fit, Trainer.evaluate, kt.run = _timed_build, timed_fit, timed_evaluate, timed_run


def main() -> None:
    _patch()
    sys.argv = ["kpeft.train", *sys.argv[1:]]
    kt.main()
    out = {"t0": T0, "marks": marks, "score": record.get("score"), "metric": record.get("metric"),
           "extra": extra}
    with open(os.environ["KPEFT_BENCH_OUT"], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
