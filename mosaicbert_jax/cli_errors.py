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
from typing import Callable, Iterator, Optional, Sequence, Type, TypeVar

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


def exit_status(main: Callable[..., object], *args, **kwargs) -> int:
    """`run_main` for a command whose main returns its exit status: 0, or EXIT_USER_ERROR after
    the one `error:` line of a user error."""
    try:
        run_main(main, *args, **kwargs)
    except SystemExit as exit_:
        if isinstance(exit_.code, int):
            return exit_.code
        raise
    return 0


def user_facing(main: Callable[..., T]) -> Callable[..., Optional[T]]:
    """Decorator form of `run_main`, for a command's entry point."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        return run_main(main, *args, **kwargs)

    return wrapped


def _flat_config_keys(config) -> list[str]:
    keys = []
    for key, value in config.items():
        if hasattr(value, "items"):
            keys += [f"{key}.{sub}" for sub in _flat_config_keys(value)]
        else:
            keys.append(key)
    return keys


def _load_config_file(argv: Sequence[str], flag: str):
    """The ConfigDict of `--<flag>=PATH` in argv (get_config() of that file), or None."""
    import importlib.util

    path = None
    for index, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            path = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and index + 1 < len(argv):
            path = argv[index + 1]
    if not path:
        return None
    if not os.path.isfile(path) and ":" in path:
        path = path.rsplit(":", 1)[0]
    try:
        spec = importlib.util.spec_from_file_location("_mosaicbert_cli_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception:  # the flag parser reports a config file that does not load
        return None


def config_override_problem(argv: Sequence[str], error: BaseException,
                            flag: str = "config") -> str:
    """One line for an error that a `--config.KEY=VALUE` override raised while absl parsed
    the flags: the unknown key and the closest valid one, else the error's own text."""
    import difflib

    overrides = [arg[len(f"--{flag}."):].split("=", 1)[0] for arg in argv
                 if arg.startswith(f"--{flag}.")]
    config = _load_config_file(argv, flag)
    if config is not None:
        known = _flat_config_keys(config)
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean --{flag}.{close[0]}?" if close else ""
                return f"unknown config key --{flag}.{key}{hint}"
    text = " ".join(str(error).replace("\\n", " ").split()).strip("'\"")
    return f"bad command-line config override: {text or type(error).__name__}"


def run_absl_app(app_main: Callable[[list[str]], object], argv: Optional[list[str]] = None,
                 config_flag: str = "config") -> None:
    """absl's app.run(app_main), where an error that parsing the flags raises (a misspelled
    or ill-typed `--config.KEY=VALUE` override) prints one `error:` line and exits 2."""
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    started = []

    def main_started(args):
        started.append(True)
        return app_main(args)

    try:
        app.run(main_started, argv=argv)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        if started or _show_traceback():
            raise
        print(f"error: {config_override_problem(argv, error, config_flag)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
