"""Experiments of your own: ``experiment=NAME`` for a name with no preset file.

``experiment`` is a config group (``conf/experiment/<preset>.yaml``, the paper tables) *and* the
root key naming the results folder (``results/runs/<experiment>/``). A name without a preset file
composes as the default config with ``experiment: NAME``: before Hydra composes, each such name
gets an in-memory group entry ``{experiment: NAME}`` in Hydra's ConfigStore, so that
``experiment=mine`` (and ``experiment=a,b`` in a sweep) works in ``kpeft.train``, ``kpeft.tables``
and every other entry point, and ``hydra.runtime.choices.experiment`` reads ``mine``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kpeft.config import CONF_DIR
from kpeft.errors import KpeftError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_OVERRIDE = re.compile(r"^(?:\+{1,2})?experiment=(.*)$")


def presets() -> list[str]:
    """The preset names (``conf/experiment/*.yaml``; ``_template`` is a template, not a preset)."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


def experiment_names(overrides: Iterable[str]) -> list[str]:
    """The experiment names of ``experiment=…`` overrides (each value of a sweep ``a,b``)."""
    names = []
    for item in overrides:
        found = _OVERRIDE.match(str(item).strip())
        if found:
            names += [n.strip() for n in found.group(1).split(",") if n.strip() not in ("", "null")]
    return names


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise KpeftError(f"experiment name '{name}' is not a folder name: use letters, digits, '_', '-' or '.' "
                         f"(presets: {', '.join(presets())})")


def register_own(overrides: Iterable[str]) -> list[str]:
    """Give each non-preset experiment name of `overrides` its in-memory group entry; returns them."""
    from hydra.core.config_store import ConfigStore

    known = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    own = []
    for name in experiment_names(overrides):
        if name in known:
            continue
        check_name(name)
        ConfigStore.instance().store(group="experiment", name=name, node={"experiment": name},
                                     package="_global_", provider="kpeft")
        own.append(name)
    return own
