"""One process per run directory: an OS file lock (``filelock``) on ``<run_dir>/.lock``, the holder's
PID and host in ``<run_dir>/.lock.pid``, and the clean-up of temporary files a killed run left.

The OS releases the lock when its holder dies, so a dead process's lock is simply taken over; its
``.lock.pid`` (then stale) is overwritten. In a multi-process run only the main process holds it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from kpeft.errors import KpeftError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.pid"


class RunLocked(KpeftError):
    """Another live process holds the run directory."""


def holder(run_dir: Path) -> str:
    """``PID <pid> on <host>`` of the lock's last holder, as it wrote it."""
    try:
        pid, _, host = (Path(run_dir) / HOLDER_NAME).read_text().strip().partition(" ")
    except OSError:
        return "an unknown process"
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory or raises :class:`RunLocked` at once."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK_NAME), timeout=0)

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunLocked(f"{self.run_dir} is in use by {holder(self.run_dir)}; wait for it to finish, or "
                            "stop that process (a dead process's lock is taken over automatically)") from None
        pid_file = self.run_dir / HOLDER_NAME
        if pid_file.exists():
            log.info("taking over the lock of %s (no longer running)", holder(self.run_dir))
        pid_file.write_text(f"{os.getpid()} {socket.gethostname()}\n")

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / HOLDER_NAME).unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def clean_tmp(run_dir: str | Path) -> list[Path]:
    """Remove the ``*.tmp`` files and folders (records, checkpoints, predictions) that a killed
    run left half-written; returns what was removed. Call it while holding the lock."""
    removed = []
    for path in sorted(Path(run_dir).rglob("*.tmp"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), run_dir)
    return removed
