"""One-line failures of the command line; light, so `--help` and bad arguments stay fast."""

from __future__ import annotations

import sys
from typing import NoReturn

from conveyor.config import Settings, SettingsError, load_settings


class CommandError(Exception):
    """A failure the command line reports as one line."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit."""
    sys.stderr.write(f"conveyor: {message}\n")
    sys.exit(code)


def settings_or_exit() -> Settings:
    """The settings, or exit 2 with one line naming the invalid variable."""
    try:
        return load_settings()
    except SettingsError as error:
        fail(str(error))
