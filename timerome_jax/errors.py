"""Errors for bad user input to the method layer (facts, hyperparameters, files)."""

from ports.errors import CheckpointError, ConfigError, UserError


class InputError(UserError):
    """A fact file, flag or hyperparameter that cannot be used as given."""


__all__ = ["CheckpointError", "ConfigError", "InputError", "UserError"]
