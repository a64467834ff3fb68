"""The one exception type users see: a problem with their input, and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class AdaptextError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits with code 2.

    The message names the problem and the fix; it never needs a traceback to be understood.
    """

    exit_code = 2


def names(values: Iterable[Any], limit: int = 10) -> str:
    """User-supplied names (columns, classes, splits) for a one-line message: comma-separated, each as
    is when printable, else as its repr (a column called "a\\nb" must not break the line), at most ``limit``."""
    items = [str(v) for v in values]
    shown = [v if v.isprintable() and v.strip() == v and v else repr(v) for v in items[:limit]]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(shown) + more
