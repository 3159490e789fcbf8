"""What every dataset shares: the constructor, the sample index, corrupt-file handling and the transform.

A dataset class states only what is its own: `splits` (our split names -> the dataset's own),
`zips` (the archives it reads from `root`), `index()` (one record per sample), `empty(records)`
(which targets are empty, for `skip_empty`) and `load(record)` (the sample).

Corrupt files. A sample whose image or annotation PNG cannot be decoded is skipped with a
warning naming the file, and the next readable sample is returned in its place carrying
`skipped` = the number of files skipped to reach it (0 for ordinary samples); an image above
`max_image_pixels` (Pillow's decompression-bomb limit unless set) is one of them. `dataset.skipped`
counts the skips made in *this* process (reset it by assigning 0); with DataLoader workers the
skips happen in the workers, so the training loop sums the `skipped` fields of the samples (or
targets) it receives instead. `on_corrupt="raise"` turns a corrupt file into an error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from eomt.data.decode import CorruptFileError, pixel_limit
from eomt.data.empty import drop_empty
from eomt.data.records import PackedRecords
from eomt.data.zipreader import ZipReader, require_file
from eomt.errors import DataError

ON_CORRUPT = ("skip", "raise")


class CorruptSampleWarning(UserWarning):
    """A sample was skipped because one of its files is corrupt."""


class Archive(NamedTuple):
    """A zip a dataset reads from its root; "{split}" in `file` and `source` is the dataset's split name."""

    file: str
    what: str  # names it in the error when it is missing, e.g. "COCO images"
    source: str  # where to get it


class SegmentationDataset(Dataset):
    """Checks `split` and `on_corrupt`, opens `zips` (attribute -> Archive) as attributes, indexes.

    `self.split` is the dataset's own name for the split (`splits[split]`; `split` itself when
    `splits` is None). `skip_empty`: leave out the samples whose target is empty (`eomt.data.empty`).
    """

    name = "dataset"  # shown in messages, e.g. "COCO panoptic"
    max_image_pixels: int | None = None  # Pillow's decompression-bomb limit while loading (None: Pillow's)
    splits: dict[str, str] | None = None
    zips: dict[str, Archive] = {}

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[dict], dict] | None = None,
        on_corrupt: str = "skip",
        skip_empty: bool = False,
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r} is not one of {ON_CORRUPT}")
        self.root = Path(root)
        self.split = split if self.splits is None else check_split(self.name, split, self.splits)
        for attribute, archive in self.zips.items():
            file, source = (text.format(split=self.split) for text in (archive.file, archive.source))
            setattr(self, attribute, ZipReader(require_file(self.root / file, archive.what, source)))
        self.transform = transform
        self.on_corrupt = on_corrupt
        self.skipped = 0
        records = self.index()
        if skip_empty:
            records = drop_empty(f"{self.name} in {self.root}", records, self.empty(records))
        self.records = PackedRecords(records)

    def index(self) -> list:
        """One record per sample, checked against the files (no pixel decoding)."""
        raise NotImplementedError

    def empty(self, records: list) -> list[bool]:
        """For each record: is its target empty (the release's rule, `eomt.data.empty`)?"""
        raise NotImplementedError

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
                with pixel_limit(self.max_image_pixels):
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
