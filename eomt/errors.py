"""Errors a user fixes (configuration, missing or damaged files, checkpoints).

The library raises these typed errors; every entry point converts them with `user_errors()` into
one line on stderr naming the thing and the fix, and exit code 1. Anything else is a programming
error and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Base class: the message is one line that names the file or key and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value or combination that cannot work (checked before anything heavy)."""


class DataError(UserError, ValueError):
    """A dataset file that is missing, truncated or holds something unusable."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the network."""


class DiskFullError(UserError):
    """A file that could not be written because its device is full (or the quota is used up)."""


class MissingPackage(ConfigError):
    """An optional package (group `export` in pyproject.toml) is not installed."""


def require(module: str, purpose: str):
    """Import an optional module, or raise one line telling what to install."""
    try:
        return __import__(module)
    except ImportError:
        raise MissingPackage(
            f"{purpose} needs the package {module}: pip install -e '.[export]' (or pip install {module})"
        ) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Wrap an entry point's work: a UserError (or a missing file) ends it with one line, exit 1.

    Also when Hydra's `instantiate` wrapped it (a dataset or model constructor raised it). Ctrl-C
    (where the work has no handler of its own, as training's loop has) is one line, exit 130.
    """
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def one_line(error: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker ("Caught X in DataLoader worker
    process 0. Original Traceback ..."), the original message at its end."""
    message = str(error)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.partition(f"{type(error).__name__}: ")[2] or last


def user_error_in(error: BaseException) -> BaseException | None:
    """`error` itself if a user fixes it, or such a cause under Hydra's InstantiationException."""
    if isinstance(error, (UserError, FileNotFoundError)):
        return error
    if type(error).__name__ == "InstantiationException" and error.__cause__ is not None:
        return user_error_in(error.__cause__)
    return None
