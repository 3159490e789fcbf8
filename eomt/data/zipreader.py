"""Read dataset files straight from their zip archives, including zips stored inside zips.

Datasets keep one reader per archive. A reader opens its handle on first use and opens it again
in every new process (DataLoader workers, fork or spawn), so a file position is never shared
between processes; pickling a reader drops its handle.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Protocol

from eomt.atomic import atomic_open
from eomt.errors import DataError

log = logging.getLogger(__name__)

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header (30 bytes)


def require_file(path: str | Path, what: str, source: str) -> Path:
    """Return `path` if it exists, else raise a one-line error naming it and where it comes from."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: expected {path} (get it from {source})")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("EOMT_CACHE", Path.home() / ".cache" / "eomt"))


class Store(Protocol):
    """Named files, from a zip archive or a folder."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of `size` bytes of a file starting at `start`."""

    def __init__(self, path: Path, start: int, size: int):
        self._file = open(path, "rb")
        self._start = start
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(base + offset, 0), self._size)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        self._file.seek(self._start + self._pos)
        data = self._file.read(n)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


class ZipReader:
    """Random access to the members of a zip file, or of a zip stored inside another zip (`inner`).

    A nested zip stored without compression (the usual case) is read in place. A compressed one
    cannot be read at random positions cheaply, so it is copied out once into `cache_dir`.
    """

    def __init__(self, path: str | Path, inner: str | None = None, cache_dir: str | Path | None = None):
        self.path = Path(path)
        self.inner = inner
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "nested_zips"
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None
        self._extracted: Path | None = None
        if not self.path.is_file():
            raise FileNotFoundError(f"zip archive {self.path} does not exist")
        if inner is not None:
            with self._archive() as outer:
                if inner not in outer.NameToInfo:
                    raise FileNotFoundError(f"{inner} not found inside {self.path}")
                if outer.getinfo(inner).compress_type != zipfile.ZIP_STORED:
                    self._extracted = self._extract_once(outer, outer.getinfo(inner))

    def __repr__(self) -> str:
        return f"ZipReader({str(self.path)!r}" + (f", inner={self.inner!r})" if self.inner else ")")

    def __str__(self) -> str:
        return f"{self.path}" + (f"!{self.inner}" if self.inner else "")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_pid"] = None
        return state

    @property
    def zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = self._open()
            self._pid = os.getpid()
        return self._zip

    def names(self) -> list[str]:
        return [info.filename for info in self.zipfile.infolist() if not info.is_dir()]

    def read(self, name: str) -> bytes:
        return self.zipfile.read(name)

    def _open(self) -> zipfile.ZipFile:
        if self.inner is None:
            return self._archive()
        if self._extracted is not None:
            return self._archive(self._extracted)
        with self._archive() as outer:
            info = outer.getinfo(self.inner)
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        name_len, extra_len = header[-2], header[-1]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        return self._archive(_FileSlice(self.path, start, info.compress_size))

    def _archive(self, source: Path | _FileSlice | None = None) -> zipfile.ZipFile:
        """zipfile.ZipFile on the archive (or the nested one); a damaged one is a DataError naming it."""
        try:
            return zipfile.ZipFile(self.path if source is None else source)
        except (zipfile.BadZipFile, EOFError, struct.error) as e:
            raise DataError(
                f"{self} is not a readable zip archive ({type(e).__name__}: {e}); it is probably "
                "truncated or damaged: download it again"
            ) from e

    def _extract_once(self, outer: zipfile.ZipFile, info: zipfile.ZipInfo) -> Path:
        stat = self.path.stat()
        key = f"{self.path.stem}-{info.filename.replace('/', '_')}-{info.CRC:08x}-{stat.st_size}"
        target = self.cache_dir / key
        if target.exists():
            return target
        log.info("copying compressed nested zip %s!%s to %s (once)", self.path, info.filename, target)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as dst, outer.open(info) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        return target


class FolderReader:
    """The files under a folder, named by their path relative to it (for users' own data)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"folder {self.path} does not exist")

    def __repr__(self) -> str:
        return f"FolderReader({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def names(self) -> list[str]:
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()


def open_store(path: str | Path) -> Store:
    """A zip file or a folder, whichever `path` is."""
    path = Path(path)
    return FolderReader(path) if path.is_dir() else ZipReader(path)
