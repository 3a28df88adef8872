"""Exceptions for mistakes a user can fix: a bad config, bad data, a bad path.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2. Anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input problem with a message that names the value and the fix."""


class ConfigError(UserError):
    """An unknown key, a wrong type or a value out of range in the config."""


class DataError(UserError):
    """A dataset that is missing, unreadable or inconsistent."""


class BackboneError(UserError):
    """An unknown backbone name or weights that cannot be loaded."""


class RunDirError(UserError):
    """An output directory that cannot be used for this run."""
