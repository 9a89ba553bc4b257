"""User-facing errors: bad names, bad values, bad files. CLIs turn them into one line and exit 2."""

from __future__ import annotations

import sys
from typing import NoReturn

EXIT_USAGE = 2


class ConfigError(ValueError):
    """Invalid user input: the message names the field or file and what was expected."""


def die(prog: str, message: str) -> NoReturn:
    """Print one error line to stderr and exit with status 2."""
    first_line = " ".join(str(message).split())
    print(f"{prog}: error: {first_line}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)
