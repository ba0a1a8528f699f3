"""Check that the installed packages are exactly the versions of the lock files (``make test`` runs
it before pytest): one line per mismatch and exit 1, or one line of success.

    python scripts/check_env.py requirements/cpu.lock requirements/offline-models.lock

A lock file holds ``name==version`` lines (comments and pip options are skipped). A local version
label (``+cpu``, ``+cu128``) is ignored on both sides: it names a build of the same release, so a
CUDA build of the locked torch passes (docs/install.md).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def canonical(name: str) -> str:
    """The PEP 503 form of a distribution name (``Foo_Bar.baz`` → ``foo-bar-baz``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(v: str) -> str:
    """`v` without its local label: ``2.13.0+cpu`` → ``2.13.0``."""
    return v.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of `path`."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, ver = line.partition("==")
        if not sep or not ver.strip():
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}; regenerate it with `make lock`")
        pins[canonical(name.split("[", 1)[0].strip())] = ver.split(";", 1)[0].strip()
    return pins


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def mismatches(pins: dict[str, str], installed: Callable[[str], str | None] = installed_version) -> list[str]:
    """One line for each pinned package that is missing or at another version."""
    out = []
    for name, want in sorted(pins.items()):
        have = installed(name)
        if have is None:
            out.append(f"{name}: not installed, locked {want}")
        elif public(have) != public(want):
            out.append(f"{name}: installed {have}, locked {want}")
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python scripts/check_env.py LOCK [LOCK ...]", file=sys.stderr)
        return 2
    bad, count = [], 0
    for arg in argv:
        path = Path(arg)
        if not path.is_file():
            print(f"check_env: no lock file {path}; run `make lock`", file=sys.stderr)
            return 2
        try:
            pins = read_lock(path)
        except ValueError as e:
            print(f"check_env: {e}", file=sys.stderr)
            return 2
        count += len(pins)
        bad += [f"{path}: {line}" for line in mismatches(pins)]
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        print(f"check_env: {len(bad)} of {count} locked packages differ; run `make install`", file=sys.stderr)
        return 1
    print(f"check_env: the {count} packages of {', '.join(argv)} are installed at their locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
