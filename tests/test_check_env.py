"""scripts/check_env.py (run by `make test` before pytest): lock parsing, one line per mismatch,
local version labels ignored, and the exit codes of the command."""

from __future__ import annotations

import importlib.util
from importlib.metadata import version
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_env.py"
_spec = importlib.util.spec_from_file_location("check_env", SCRIPT)
check_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_env)


def test_read_lock_keeps_pins_and_skips_comments_options_and_markers(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("# header\n--find-links /opt/wheels\n\nTorch==2.13.0+cpu   # via kpeft\n"
                    "ruamel.yaml_clib==0.2.12\nuvloop==0.21.0 ; sys_platform != 'win32'\nhydra-core[x]==1.3.8\n")
    assert check_env.read_lock(lock) == {"torch": "2.13.0+cpu", "ruamel-yaml-clib": "0.2.12",
                                         "uvloop": "0.21.0", "hydra-core": "1.3.8"}


def test_a_line_that_is_not_a_pin_is_an_error_naming_the_fix(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match=r"x.lock:1: expected name==version.*make lock"):
        check_env.read_lock(lock)


def test_one_line_per_missing_or_different_package_and_local_labels_are_ignored():
    installed = {"torch": "2.13.0+cu128", "numpy": "2.4.5", "scipy": "1.17.1"}.get
    pins = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "scipy": "1.17.1", "mkdocs": "1.6.1"}
    assert check_env.mismatches(pins, installed) == ["mkdocs: not installed, locked 1.6.1",
                                                     "numpy: installed 2.4.5, locked 2.4.6"]
    assert check_env.mismatches({"torch": "2.13.0"}, {"torch": "2.14.0+cpu"}.get) == [
        "torch: installed 2.14.0+cpu, locked 2.13.0"]


def test_the_command_passes_on_matching_pins_and_fails_on_others(tmp_path, capsys):
    good, bad = tmp_path / "good.lock", tmp_path / "bad.lock"
    good.write_text(f"pytest=={version('pytest')}\n")
    bad.write_text("pytest==0.0.1\nno-such-package-kpeft==1.0\n")
    assert check_env.main([str(good)]) == 0
    assert "1 packages" in capsys.readouterr().out
    assert check_env.main([str(good), str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{bad}: no-such-package-kpeft: not installed, locked 1.0",
                   f"{bad}: pytest: installed {version('pytest')}, locked 0.0.1",
                   "check_env: 2 of 3 locked packages differ; run `make install`"]
    assert check_env.main([str(tmp_path / "missing.lock")]) == 2
