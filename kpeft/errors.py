"""User-facing errors: one line that names the fix, no traceback unless KPEFT_DEBUG=1."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class KpeftError(Exception):
    """An error the user can act on; its message says what to change."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors end, like every other user error, in one ``kpeft: error:`` line
    (after the usage) and exit 2, under :func:`user_errors`."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        raise KpeftError(f"{message} (see {self.prog} --help)")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a CLI entry point: print a KpeftError as ``kpeft: error: ...`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (KpeftError, OSError, UnicodeDecodeError) as err:
            message = describe(err)
            if message is None or os.environ.get("KPEFT_DEBUG"):
                raise
            print(f"kpeft: error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def describe(err: BaseException) -> str | None:
    """The one-line message of a user error: a KpeftError's own; a file that cannot be read or
    written (an OSError naming its path, e.g. an output folder under a file, a read-only folder);
    a file that is not UTF-8 text. None for anything else (a bug: its traceback is shown)."""
    if isinstance(err, KpeftError):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None:
        return (f"{err.strerror or type(err).__name__}: '{err.filename}'; check the path (its folders must be "
                "folders, not files) and its permissions")
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err.reason} at byte {err.start}); pass the right file"
    return None
