"""Read an experiment preset: the composed run config and its table spec."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kpeft.compose import _composition_error, check_choices
from kpeft.config import CONF_DIR, register_configs
from kpeft.errors import KpeftError
from kpeft.experiments.collect import load_runs
from kpeft.experiments.spec import TableSpec, infer_spec


def compose_preset(overrides: Sequence[str]) -> DictConfig:
    """The root config of `overrides` with its ``hydra`` node (where the table spec lives)."""
    register_configs()
    check_choices(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise KpeftError(_composition_error(err)) from None


def declared_spec(cfg: DictConfig) -> TableSpec | None:
    """The preset's ``hydra.sweeper.table`` (None for presets without one)."""
    node = OmegaConf.select(cfg, "hydra.sweeper.table", default=None)
    if node is None:
        return None
    return OmegaConf.to_object(node)


def runs_root(cfg: DictConfig) -> Path:
    """Where the preset's records are (relative paths: to the working directory, as for runs)."""
    return Path(cfg.output_root) / cfg.experiment


def table_spec(cfg: DictConfig) -> TableSpec:
    """The declared spec, or one inferred from the preset and its records."""
    spec = declared_spec(cfg)
    if spec is not None:
        return spec
    found = [(t, me, b, s) for (t, mo, me, b, s) in load_runs(runs_root(cfg)) if mo == cfg.model.name]
    order = list((cfg.get("method_train") or {}).keys()) or [cfg.method.name]
    return infer_spec(cfg.experiment, cfg.budget.name, [cfg.task.name], found, order)
