"""What every dataset shares: the sample index, corrupt-file handling and the training transform.

Corrupt files. A sample whose image or annotation PNG cannot be decoded is skipped with a
warning naming the file, and the next readable sample is returned in its place carrying
`skipped` = the number of files skipped to reach it (0 for ordinary samples). `dataset.skipped`
counts the skips made in *this* process (reset it by assigning 0); with DataLoader workers the
skips happen in the workers, so the training loop sums the `skipped` fields of the samples (or
targets) it receives instead. `on_corrupt="raise"` turns a corrupt file into an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from eomt.data.decode import CorruptFileError
from eomt.data.records import PackedRecords
from eomt.errors import DataError

ON_CORRUPT = ("skip", "raise")


class CorruptSampleWarning(UserWarning):
    """A sample was skipped because one of its files is corrupt."""


class SegmentationDataset(Dataset):
    """A dataset whose subclasses fill `self.records` and implement `load(record) -> sample`."""

    name = "dataset"  # shown in messages, e.g. "COCO panoptic"

    def __init__(self, transform: Callable[[dict], dict] | None = None, on_corrupt: str = "skip"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r} is not one of {ON_CORRUPT}")
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.skipped = 0
        self.records = PackedRecords([])

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples)"

    def load(self, record: Any) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        skipped = 0
        for offset in range(len(self)):
            record = self.records[(index + offset) % len(self)]
            try:
                sample = self.load(record)
            except CorruptFileError as e:
                if self.on_corrupt == "raise":
                    raise
                warnings.warn(f"{self.name}: skipping corrupt {e}", CorruptSampleWarning, stacklevel=2)
                self.skipped += 1
                skipped += 1
                continue
            sample["skipped"] = skipped
            return self.transform(sample) if self.transform is not None else sample
        raise RuntimeError(f"{self.name}: every one of the {len(self)} samples is corrupt")


def check_split(dataset: str, split: str, splits: dict[str, str]) -> str:
    """The dataset's own name for `split` ("train" -> "training"); unknown splits are an error."""
    if split not in splits:
        raise ValueError(f"{dataset}: unknown split {split!r}; choose one of {sorted(splits)}")
    return splits[split]


def check_matches(dataset: str, missing: list[str], what: str, where: str) -> None:
    """One-line error when annotations and files do not match: `missing` lists what is absent."""
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(f"{dataset}: {len(missing)} {what} missing from {where} (e.g. {shown})")
