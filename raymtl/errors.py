"""User-facing errors: bad names, bad values, bad files. CLIs turn them into one line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import NoReturn, TypeVar

EXIT_USAGE = 2


class ConfigError(ValueError):
    """Invalid user input: the message names the field or file and what was expected."""


def die(prog: str, message: str) -> NoReturn:
    """Print one error line to stderr and exit with status 2."""
    first_line = " ".join(str(message).split())
    print(f"{prog}: error: {first_line}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


F = TypeVar("F", bound=Callable[..., int])


def exits_cleanly_on_config_error(prog: str) -> Callable[[F], F]:
    """Decorate a CLI ``main(argv)`` so a ConfigError becomes one stderr line and exit 2."""

    def decorate(main: F) -> F:
        @wraps(main)
        def wrapper(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except ConfigError as err:
                die(prog, str(err))

        return wrapper  # type: ignore[return-value]

    return decorate
