"""The one error type that ``statex-train`` reports as bad input (one line, exit 2)."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""
