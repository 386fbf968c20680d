"""The one error type of a user's mistake in a recipe or an override, shared by config.py and every
method's and stage kind's own checks: the CLI turns it into exit status 2 with its one-line message."""
from typing import Any


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; the message is one line naming the key and the value."""


def check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")
