"""One base for every error the user can fix: bad config, bad path, bad model, full disk, NaN loss, corrupt cache.

The entry point catches `UserError` alone and prints `error (<kind>): <message>`; the message says what is
wrong and how to fix it, so the traceback would only bury it. Anything else is a bug and keeps its traceback.
Subclasses may also derive from the builtin they replace (ValueError, OSError, MemoryError) so that code
catching the builtin keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """An input or resource problem with a fix the message names; finished work is kept and a rerun resumes."""

    kind = "input"  # the word in `error (<kind>): ...`
    # 3: fix your input (config, model, data) and rerun; 2 is kept for the environment (tracking store down,
    # run folder busy) and for command-line usage errors.
    exit_code = 3

    def describe(self) -> str:
        """The one line the user sees: `error (<kind>): <message>`."""
        return f"error ({self.kind}): {self}"


class ConfigError(UserError, ValueError):
    """A preset, key or value the pipeline cannot accept; the message says what would be valid."""

    kind = "config"


class UnsupportedModelError(UserError, NotImplementedError):
    """A model whose architecture this operation does not cover; the message names what would work."""

    kind = "model"


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`: how each config section states its rules, once, where it is defined."""
    if not ok:
        raise ConfigError(message)
