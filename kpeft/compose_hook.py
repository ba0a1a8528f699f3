"""kpeft's step of Hydra's composition: a preset's per-task / per-method tables and the run identity
are applied *inside* composition, so that the config Hydra composes, prints (``--cfg job``), saves in
``.hydra/`` and logs is the one that runs and is stored in the record.

Hydra 1.3 has no composition callback (``Callback.on_compose_config`` came with 1.4), so
:func:`install` wraps ``ConfigLoaderImpl.load_configuration``, the one function every path goes
through: ``@hydra.main`` runs, ``--cfg``/``--info``, each job of a multirun (``load_sweep_config``),
the kpeft sweeper's plan and the ``hydra.compose`` API. It acts only on kpeft's root config.

Order of precedence, low to high: the composed groups and preset < the preset's tables
(``task_overrides``, ``method_train``, ``method_overrides``; :func:`kpeft.compose.apply_method_train`)
< the command line's ``key=value`` overrides (re-applied after the tables). Then ``run_id`` is set:
``""`` when the semantic config equals the one the preset gives for the same
experiment/model/method/budget/task/seed, else ``-<hash>`` of the difference, listed in
``run_overrides`` (:mod:`kpeft.runid`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from kpeft import runid
from kpeft.budget_match import MATCH, solve

IDENTITY_KEYS = ("seed",)  # key overrides kept in the preset's own config (groups are always kept)
_original = ConfigLoaderImpl.load_configuration


def _is_kpeft(cfg: DictConfig) -> bool:
    return all(k in cfg for k in ("method_train", "task_overrides", "run_id", "run_overrides"))


def _value_overrides(cfg: DictConfig, overrides: list[str]) -> list[Override]:
    """The command line's ``key=value`` overrides of the app (not groups, not hydra, not sweeps)."""
    groups = set(cfg.hydra.runtime.choices.keys())
    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    return [o for o in parsed if not o.is_hydra_override() and o.key_or_group not in groups
            and not o.is_sweep_override() and not o.is_delete()]


def _reapply(cfg: DictConfig, overrides: list[Override]) -> None:
    """Apply value overrides again (``+key`` as ``++key``: the key exists after the first time)."""
    again = [dataclasses.replace(o, type=OverrideType.FORCE_ADD) if o.is_add() else o for o in overrides]
    ConfigLoaderImpl._apply_overrides_to_config(again, cfg)


def _with_tables(cfg: DictConfig, overrides: list[Override]) -> DictConfig:
    from kpeft.compose import apply_method_train

    cfg = apply_method_train(cfg)
    _reapply(cfg, overrides)
    if cfg.budget.get("name") == MATCH:
        cfg = solve(cfg)  # counts on the meta device; a missing target is check_method_fits_budget's error
    return cfg


def _semantic(cfg: DictConfig) -> dict[str, Any]:
    node = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    return runid.semantic(OmegaConf.to_container(node, resolve=True, throw_on_missing=False))


def _identity(self: ConfigLoaderImpl, cfg: DictConfig, config_name: str | None, overrides: list[str]) -> None:
    """Set ``run_id`` / ``run_overrides`` from the difference to the preset's own config."""
    groups = set(cfg.hydra.runtime.choices.keys())
    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    if all(o.is_hydra_override() or o.key_or_group in groups or o.key_or_group in IDENTITY_KEYS
           or runid.inert(o.key_or_group) for o in parsed):  # the preset's own config: no second composition
        with open_dict(cfg):
            cfg.run_id, cfg.run_overrides = "", []
        return
    kept = [line for line, o in zip(overrides, parsed)
            if o.is_hydra_override() or o.key_or_group in groups or o.key_or_group in IDENTITY_KEYS]
    try:
        base = _original(self, config_name, kept, RunMode.RUN, from_shell=False, validate_sweep_overrides=False)
        base = _with_tables(base, _value_overrides(base, kept))
        now, before = _semantic(cfg), _semantic(base)
    except Exception:  # an unresolvable config: the run reports it in one line (kpeft.compose)
        return
    changed = {k: now.get(k, "<deleted>") for k in runid.difference(now, before)}
    with open_dict(cfg):
        cfg.run_id = runid.run_suffix(changed)
        cfg.run_overrides = runid.override_lines(changed)


@functools.wraps(_original)
def load_configuration(self: ConfigLoaderImpl, config_name: str | None, overrides: list[str], run_mode: RunMode,
                       from_shell: bool = True, validate_sweep_overrides: bool = True) -> DictConfig:
    if config_name == "config":  # kpeft's root config: experiment=NAME without a preset file
        from kpeft.experiments.own import register_own

        register_own(overrides)
    cfg = _original(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
    if not _is_kpeft(cfg):
        return cfg
    try:
        cfg = _with_tables(cfg, _value_overrides(cfg, overrides))
    except OmegaConfBaseException as err:
        from hydra.errors import ConfigCompositionException

        raise ConfigCompositionException(str(err)) from err
    if run_mode == RunMode.RUN:  # a multirun's jobs are composed one by one, in RUN mode
        _identity(self, cfg, config_name, overrides)
    return cfg


def install() -> None:
    """Wrap Hydra's config loader (idempotent)."""
    ConfigLoaderImpl.load_configuration = load_configuration  # type: ignore[method-assign]
