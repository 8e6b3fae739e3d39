"""Errors a user can cause, each carrying one sentence that names the problem.

`UserError` is the base of every error the command line turns into a one-line message and a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with something the user supplied (a file, a flag, a checkpoint, a fact)."""


class ConfigError(UserError):
    """A `config.json` that is missing, unreadable, or asks for something this port does not implement."""


class CheckpointError(UserError):
    """Checkpoint files that are missing, unreadable, or do not match the architecture."""
