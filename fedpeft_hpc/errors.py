"""User-facing errors: the CLI turns these into a short message and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config key, value, file). Exit status 2, no traceback."""


class ConfigError(UserError):
    """A config key or value is wrong. The message names the key and what would be valid."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class DataError(UserError):
    """A dataset or data file is missing or malformed."""


class CheckpointError(UserError):
    """A checkpoint or weights file is missing, unreadable or does not fit the model."""


class RanksDisagree(UserError):
    """Every rank of a job found that the ranks differ (the check is collective): all ranks
    raise it together, so they can still leave the process group together."""

    raised_by_all_ranks = True
