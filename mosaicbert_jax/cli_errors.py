"""One-line errors for command-line mistakes: `error: <message>` on stderr and exit code 2.

A command's main runs under `run_main` (or the `user_facing` decorator). A user's mistake
(a `UserError`, or a ValueError / FileNotFoundError that this package raises on purpose with a
`raise` statement) prints one line; anything else is a bug and keeps its traceback. Set
MOSAICBERT_TRACEBACK=1 to see the traceback of a user error too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from typing import Callable, Iterator, Optional, Type, TypeVar

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "MOSAICBERT_TRACEBACK"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

T = TypeVar("T")


class UserError(ValueError):
    """A mistake in what the user gave (a path, a value, a flag); the message says the fix."""


def is_user_error(error: BaseException) -> bool:
    """True for a UserError, or a ValueError / FileNotFoundError whose innermost frame is a
    `raise` statement in this package (raised on purpose, not by a bug deeper down)."""
    if isinstance(error, UserError):
        return True
    if not isinstance(error, (ValueError, FileNotFoundError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    innermost = frames[-1]
    in_package = os.path.abspath(innermost.filename).startswith(_PACKAGE_DIR + os.sep)
    return in_package and (innermost.line or "").lstrip().startswith("raise")


@contextlib.contextmanager
def as_user_error(*types: Type[BaseException]) -> Iterator[None]:
    """Re-raises errors of `types` from the block as UserError: for calls whose failures can only
    come from what the user gave (e.g. loading a tokenizer the user named)."""
    try:
        yield
    except types as error:
        if isinstance(error, UserError):
            raise
        raise UserError(str(error)) from error


def _show_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_main(main: Callable[..., T], *args, **kwargs) -> T:
    """Calls `main`; a user error prints `error: <message>` and exits 2, Ctrl-C exits 130."""
    try:
        return main(*args, **kwargs)
    except KeyboardInterrupt:
        if _show_traceback():
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except (ValueError, FileNotFoundError) as error:
        if not is_user_error(error) or _show_traceback():
            raise
        message = " ".join(str(error).split("\n")) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def user_facing(main: Callable[..., T]) -> Callable[..., Optional[T]]:
    """Decorator form of `run_main`, for a command's entry point."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        return run_main(main, *args, **kwargs)

    return wrapped
