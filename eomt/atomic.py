"""Atomic file writes: a file appears under its final name only once it is complete.

Checkpoints, metrics, predictions and caches are written to a temp file in the same folder and
renamed over the target (`os.replace`), so a crash or a preemption never leaves a half-written
file that a later run would trust. A full disk (or quota) ends such a write in one DiskFullError
naming the folder and the size that did not fit; the target keeps its previous contents.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from eomt.errors import DiskFullError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is "no space left on device"
    (torch.save reports it as a RuntimeError raised while handling the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@contextmanager
def disk_full_as_one_line(path: str | Path, size: int | None = None, note: str = "") -> Iterator[None]:
    """Turn a full disk while writing `path` into one DiskFullError naming its folder and `size`
    (the bytes to write, when known), with `note` (e.g. where a run resumes) added."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        path = Path(path)
        what = f"{path.name} ({human_size(size)})" if size is not None else path.name
        raise DiskFullError(
            f"no space left on the device of {path.parent}: could not write {what}; nothing was lost "
            f"(the earlier files are intact){note}. Free space there, or point the output elsewhere, and run again"
        ) from e


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", size: int | None = None) -> Iterator[IO]:
    """A temp file in `path`'s folder, renamed to `path` once complete; `size`: the bytes it will hold,
    when known, for the message if the disk is full."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with disk_full_as_one_line(path, size):
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb", size=len(data)) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", size=len(text.encode())) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=indent is not None) + ("\n" if indent else ""))
