"""User-facing errors: printed as one line by the CLI, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input (unknown name, bad value, missing weights or data)."""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """`unknown method 'fastvv' (did you mean 'fastv'?); valid: a, b, c`."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown {kind} '{name}'{hint}; valid choices: {', '.join(choices)}")
