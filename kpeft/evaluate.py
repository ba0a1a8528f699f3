"""``python -m kpeft.evaluate RUN_DIR [split=test] [checkpoint=best|last] [task.data_dir=DIR] [key=value …]``

Evaluates a finished run again without training: loads its config and its ``best`` (or ``last``)
checkpoint, applies the overrides (another split, data folder, decoding, ``task.options``),
evaluates, and writes an evaluation record next to the training record:
``RUN_DIR/evaluations/<split>-<hash>.json`` (hash: 8 hex digits of split, checkpoint and
overrides), with the per-example files under ``RUN_DIR/evaluations/<split>-<hash>/``.
``record.json`` and the run's own generations are never touched. Prints the metrics and, as its
last stdout line, ``{"evaluation", "split", "checkpoint", "metric", "score"}``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kpeft.errors import ArgumentParser, KpeftError, user_errors
from kpeft.records import evaluation_record, write_json_atomic

CHECKPOINTS = ("best", "last")


def parse(argv: Sequence[str]) -> tuple[Path, str, str, list[str]]:
    parser = ArgumentParser(prog="python -m kpeft.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by python -m kpeft.train")
    parser.add_argument("overrides", nargs="*", help="split=…, checkpoint=best|last, and config key=value")
    args = parser.parse_args(list(argv))
    split, checkpoint, rest = "test", "best", []
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise KpeftError(f"'{item}' is not key=value (e.g. split=validation, checkpoint=last, task.data_dir=DIR)")
        if key == "split":
            split = value
        elif key == "checkpoint":
            checkpoint = value
        else:
            rest.append(item)
    if checkpoint not in CHECKPOINTS:
        raise KpeftError(f"checkpoint={checkpoint} is not valid; valid: {', '.join(CHECKPOINTS)}")
    return Path(args.run_dir), split, checkpoint, rest


def evaluation_id(split: str, checkpoint: str, overrides: Sequence[str]) -> str:
    text = json.dumps([split, checkpoint, sorted(overrides)], separators=(",", ":"))
    return f"{split}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def evaluate_run(run_dir: Path, split: str = "test", checkpoint: str = "best", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate `run_dir`'s `checkpoint` on `split`; write and return the evaluation record."""
    from kpeft.api import run_config
    from kpeft.compose import check_unknown_keys
    from kpeft.train import build, seed_everything
    from kpeft.training.checkpoint import ADAPTER_FILE, load_adapter
    from kpeft.training.loop import Trainer, make_accelerator
    from kpeft.validate import check_config

    t0 = time.perf_counter()
    cfg = run_config(run_dir)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise KpeftError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}") from None
    check_unknown_keys(cfg)
    check_config(cfg)
    ckpt = run_dir / "checkpoints" / checkpoint
    if not (ckpt / ADAPTER_FILE).is_file():
        raise KpeftError(f"run '{run_dir}' has no {checkpoint} checkpoint ({ckpt / ADAPTER_FILE}); valid: "
                         f"{', '.join(c for c in CHECKPOINTS if (run_dir / 'checkpoints' / c / ADAPTER_FILE).is_file())}")
    seed_everything(cfg.seed, cfg.train.deterministic)
    adapted, task, splits = build(cfg)
    if split not in splits or not splits[split]:
        have = ", ".join(k for k, v in splits.items() if v)
        raise KpeftError(f"split={split}: task '{cfg.task.name}' has no such examples here; valid: {have}")
    load_adapter(ckpt, adapted)
    accelerator = make_accelerator(cfg.train)
    adapted.model.to(accelerator.device)
    name = evaluation_id(split, checkpoint, overrides)
    folder = run_dir / "evaluations"
    # The Trainer writes its per-example files under its run_dir: the evaluation's own folder. Its
    # optimizer is never stepped (a data folder without a training split is fine).
    trainer = Trainer(cfg, adapted, task, {**splits, "train": splits.get("train") or splits[split]},
                      folder / name, accelerator)
    metrics = trainer.evaluate(split, save_examples=True)
    record = evaluation_record(cfg, run_dir, split, checkpoint, list(overrides), metrics, folder / name,
                               wall_seconds=time.perf_counter() - t0)
    path = folder / f"{name}.json"
    if accelerator.is_main_process:
        write_json_atomic(path, record)
    record["_path"] = str(path)
    return record


@user_errors
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    run_dir, split, checkpoint, overrides = parse(sys.argv[1:] if argv is None else argv)
    record = evaluate_run(run_dir, split, checkpoint, overrides)
    for key, value in record["metrics"][split].items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    summary = {"evaluation": record["_path"], "split": split, "checkpoint": checkpoint,
               "metric": record["metric"], "score": record["score"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
