"""Errors a user can fix: stage scripts print them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something in the user's params, data or environment that they can correct."""

    exit_code = 1


class ConfigError(UserError):
    """A key or value in params.yaml that is unknown, of the wrong type, or impossible."""


class DataError(UserError):
    """A dataset source that is missing, corrupt, unsafe or of an unknown layout."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError naming `key`, its `value` and what is `allowed`, unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def first_line(exc: BaseException) -> str:
    """An exception's message as one line: its first non-blank line, or its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
