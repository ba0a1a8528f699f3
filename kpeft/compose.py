"""Compose the Hydra config outside ``@hydra.main`` (count, score, demo, tests) and turn
composition problems into one-line errors that list the valid choices."""

from __future__ import annotations

import re
from collections.abc import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kpeft.config import CONF_DIR, register_configs
from kpeft.errors import KpeftError

GROUPS = ("model", "method", "budget", "task", "train", "logger", "experiment")


def available(group: str) -> list[str]:
    """The config names of a group (the YAML files in ``conf/<group>/``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choices(overrides: Sequence[str]) -> None:
    """Fail early, in one line, on ``group=name`` overrides naming no config (sweeps too)."""
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("", "null"):
            continue
        for name in value.split(","):
            name = name.strip()
            if name and name not in available(key):
                raise KpeftError(f"unknown {key} '{name}'; valid: {', '.join(available(key))}")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed root config for `overrides` (``key=value`` strings, as on the CLI)."""
    register_configs()
    check_choices(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except MissingConfigException as err:
        raise KpeftError(str(err).splitlines()[0]) from None
    except (HydraException, OmegaConfBaseException) as err:
        raise KpeftError(_one_line(err)) from None
    check_method_fits_budget(cfg)
    return cfg


def _one_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return "; ".join(ln for ln in lines if not ln.startswith(("reference_type", "object_type")))


def budgets_sizing(section: str) -> list[str]:
    """Budgets whose YAML gives a size for `section` (e.g. ``lora``)."""
    return [b for b in available("budget") if section in OmegaConf.load(CONF_DIR / "budget" / f"{b}.yaml")]


def check_method_fits_budget(cfg: DictConfig) -> None:
    """Resolve the method's sizes; a budget that does not size the method is an error."""
    try:
        OmegaConf.to_container(cfg.method, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        # The method interpolates ${budget.<section>.<size>}; a missing one means the budget
        # does not size this method.
        found = re.search(r"Missing mandatory value: budget\.(\w+)", str(err))
        if found:
            section = found.group(1)
            raise KpeftError(
                f"method '{cfg.method.name}' cannot meet budget '{cfg.budget.name}': it gives no "
                f"{section} size; budgets that do: {', '.join(budgets_sizing(section)) or 'none'}"
            ) from None
        if isinstance(err, MissingMandatoryValue):
            raise KpeftError(f"missing value {err.full_key}; set it on the command line") from None
        raise KpeftError(_one_line(err)) from None
