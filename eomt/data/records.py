"""A dataset index packed into one byte buffer.

A Python list of a hundred thousand dicts is touched (refcounts) by every DataLoader worker and so
copied into each of them page by page; one NumPy buffer plus offsets is shared for free after fork
and pickles quickly for spawn.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np


class PackedRecords:
    """An immutable sequence of picklable records."""

    def __init__(self, records: Iterable[Any]):
        blobs = [
            np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for r in records
        ]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        start, end = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[start:end].tobytes())
