"""Errors a user can fix: stage scripts print them as one line, without a traceback."""


class UserError(Exception):
    """Something in the user's params, data or environment that they can correct."""


class ConfigError(UserError):
    """A key or value in params.yaml that is unknown, of the wrong type, or impossible."""


class DataError(UserError):
    """A dataset source that is missing, corrupt, unsafe or of an unknown layout."""
