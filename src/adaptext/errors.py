"""The one exception type users see: a problem with their input, and how to fix it."""

from __future__ import annotations


class AdaptextError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits with code 2.

    The message names the problem and the fix; it never needs a traceback to be understood.
    """

    exit_code = 2
