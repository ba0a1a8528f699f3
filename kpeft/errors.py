"""User-facing errors: one line that names the fix, no traceback unless KPEFT_DEBUG=1."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class KpeftError(Exception):
    """An error the user can act on; its message says what to change."""


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a CLI entry point: print a KpeftError as ``kpeft: error: ...`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KpeftError as err:
            if os.environ.get("KPEFT_DEBUG"):
                raise
            print(f"kpeft: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
