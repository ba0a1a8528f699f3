"""Compose the Hydra config outside ``@hydra.main`` (count, score, demo, tests) and turn
composition problems into one-line errors that list the valid choices."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from kpeft.budget_match import MATCH
from kpeft.config import CONF_DIR, register_configs
from kpeft.errors import KpeftError
from kpeft.validate import check_config

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
        if key == "experiment":  # a name without a preset is an experiment of your own (a new folder)
            from kpeft.experiments.own import register_own

            register_own([f"experiment={value}"])
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
        raise KpeftError(_composition_error(err)) from None
    check_unknown_keys(cfg)
    check_method_fits_budget(cfg)
    check_config(cfg)
    return cfg


def apply_method_train(cfg: DictConfig) -> DictConfig:
    """Apply an experiment preset's per-task and per-method settings, inside composition
    (kpeft/compose_hook.py: the command line's ``key=value`` overrides are applied after them):

    1. ``task_overrides[<task name>]``, a partial root config, into the root;
    2. ``method_train[<method name>]`` (per-method hyper-parameters) into ``train``, then its
       ``by_task[<task name>]`` entry (a paper's per-task values for that method, e.g.
       ``{lr: 1.0e-3, by_task: {coqa: {lr: 5.0e-3, batch_size: 8}}}``);
    3. ``method_overrides[<method name>]`` (a partial method config) into ``method``, then its
       ``by_task[<task name>]`` entry (e.g. KronA's per-task factor shapes, Table 16).

    A key that the target does not have is an error naming it."""
    extra = (cfg.get("task_overrides") or {}).get(cfg.task.name)
    if extra:
        try:
            cfg = OmegaConf.merge(cfg, extra)
        except OmegaConfBaseException as err:
            raise KpeftError(f"task_overrides.{cfg.task.name}: {_one_line(err)}") from None
    cfg = _merge_method_table(cfg, "method_train", "train")
    return _merge_method_table(cfg, "method_overrides", "method")


def _merge_method_table(cfg: DictConfig, table: str, target: str) -> DictConfig:
    """Merge ``<table>[<method>]`` and its ``by_task[<task>]`` entry into ``cfg.<target>``."""
    extra = (cfg.get(table) or {}).get(cfg.method.name)
    if not extra:
        return cfg
    by_task = extra.get("by_task") or {}
    layers = [{k: v for k, v in extra.items() if k != "by_task"}, by_task.get(cfg.task.name) or {}]
    try:
        merged = OmegaConf.merge(cfg[target], *layers)
    except OmegaConfBaseException as err:
        raise KpeftError(f"{table}.{cfg.method.name}: {_one_line(err)}") from None
    with open_dict(cfg):
        cfg[target] = merged
    return cfg


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return "; ".join(ln for ln in lines if not ln.startswith(("reference_type", "object_type")))


def _schema_fields(schema: object) -> list[str] | None:
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None


def _moved(key: str) -> str:
    """The hint for a key that moved: a component's ``train_layernorm`` is the method's now."""
    if key.startswith("method.components.") and key.endswith(".train_layernorm"):
        return ("; train_layernorm is a key of the method (one switch for the whole backbone): "
                "method.train_layernorm=true|false, or budget.<method>.train_layernorm")
    return ""


def _composition_error(err: BaseException) -> str:
    """Hydra's message plus the reason OmegaConf gave (``... could not be converted to Float``);
    a key missing from a typed schema is named with the schema's fields, not with Hydra's advice
    to add it with ``+`` (which would be silently ignored)."""
    cause = err.__cause__
    if not isinstance(cause, OmegaConfBaseException):
        return _one_line(err)
    schema = getattr(cause, "object_type", None)
    valid = _schema_fields(schema)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and valid is not None:
        key = getattr(cause, "full_key", None) or "?"
        return f"unknown key '{key}'; {schema.__name__} has: {', '.join(valid)}{_moved(str(key))}"
    return f"{_one_line(err)}: {_one_line(cause)}"


def check_unknown_keys(node: DictConfig, path: str = "") -> None:
    """Keys that ``+key=value`` added to a typed node (no schema field): a misspelling that would
    otherwise be silently ignored."""
    valid = _schema_fields(OmegaConf.get_type(node))
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if valid is not None and key not in valid:
            raise KpeftError(f"unknown key '{full}'; {OmegaConf.get_type(node).__name__} has: {', '.join(valid)}"
                             f"{_moved(full)}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_missing() or child._is_none() or child._is_interpolation()):
            check_unknown_keys(child, full)


def budgets_sizing(section: str) -> list[str]:
    """Budgets whose YAML gives a size for `section` (e.g. ``lora``)."""
    return [b for b in available("budget") if section in OmegaConf.load(CONF_DIR / "budget" / f"{b}.yaml")]


def check_method_fits_budget(cfg: DictConfig) -> None:
    """Resolve the method's sizes; a budget that does not size the method is an error."""
    if cfg.budget.get("name") == MATCH and cfg.budget.get("target") is None:
        raise KpeftError("budget=match needs a target: add budget.target=<count> or budget.target=<pct>% "
                         "(e.g. budget.target=0.34%)")
    try:
        OmegaConf.to_container(cfg.method, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        # The method interpolates ${budget.<section>.<size>}; a missing one means the budget
        # does not size this method.
        found = re.search(r"Missing mandatory value: budget\.(\w+)", str(err))
        # ... or reads a section the budget leaves out (optional sections default to None).
        absent = re.search(r"Interpolation key 'budget\.(\w+)\.", str(err))
        if not found and absent and absent.group(1) in cfg.budget and cfg.budget[absent.group(1)] is None:
            found = absent
        if found:
            section = found.group(1)
            others = [b for b in budgets_sizing(section) if b != cfg.budget.name]
            raise KpeftError(
                f"method '{cfg.method.name}' cannot meet budget '{cfg.budget.name}': it gives no "
                f"{section} size; budgets that do: {', '.join(others) or 'none'}"
            ) from None
        if isinstance(err, MissingMandatoryValue):
            raise KpeftError(f"missing value {err.full_key}; set it on the command line") from None
        raise KpeftError(_one_line(err)) from None
