"""Metric logging: a CSV file in the run directory always; Weights & Biases when asked."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kpeft.errors import KpeftError

CSV_FIELDS = ("step", "epoch", "key", "value")


class MetricsLogger:
    """Long-format CSV (``step, epoch, key, value``) plus optional wandb; main process only."""

    def __init__(self, run_dir: Path, cfg: DictConfig, active: bool = True, resume_step: int | None = None):
        self.active = active
        self.path = Path(run_dir) / "metrics.csv"
        self.wandb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)  # drop rows the killed run logged after its checkpoint
        elif self.path.exists():
            self.path.unlink()
        new = not self.path.exists()
        self._fh = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._csv = csv.writer(self._fh)
        if new:
            self._csv.writerow(CSV_FIELDS)
        if cfg.logger.name == "wandb":
            self.wandb = _start_wandb(cfg, run_dir)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)

    def log(self, step: int, epoch: float, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        for key, value in metrics.items():
            self._csv.writerow([step, f"{epoch:.4f}", key, value])
        self._fh.flush()
        if self.wandb is not None:
            self.wandb.log({**metrics, "epoch": epoch}, step=step)

    def close(self) -> None:
        if self.active:
            self._fh.close()
            if self.wandb is not None:
                self.wandb.finish()


def _start_wandb(cfg: DictConfig, run_dir: Path):
    try:
        import wandb
    except ImportError:
        raise KpeftError("logger=wandb needs the wandb package: pip install wandb (or use logger=csv)") from None
    run_id = "-".join(Path(run_dir).parts[-5:]).replace("/", "-")[:120]
    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode, dir=str(run_dir),
        id=run_id, resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
    )
