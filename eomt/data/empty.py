"""Which training images have an empty target, and leaving them out as the authors' release does.

The release drops these images when it builds a dataset (training and validation alike; we drop
them from training only, validation scores every image as the official protocols do):
- a COCO-format panoptic JSON: no segment in the image's `segments_info`;
- a COCO instances JSON: no annotation of the image (crowd annotations count);
- ADE20K and Cityscapes: the label PNG holds a single value (every band of PIL's `getextrema` has
  min == max), whatever that value is. ADE20K panoptic also drops an image whose instance PNG is
  constant when it has neither a stuff class in the semantic PNG nor an instance.
The PNG rules need every label PNG decoded once; the answer is cached under
`$EOMT_CACHE/empty_targets`, keyed by the PNGs' names, sizes and CRCs, so later runs read a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from eomt.atomic import write_json
from eomt.data.decode import _READ_ERRORS
from eomt.data.zipreader import Store, ZipReader, default_cache_dir

log = logging.getLogger(__name__)

RULES_VERSION = 1  # bump when a rule changes, so cached answers are recomputed


def drop_empty(dataset: str, records: list[Any], empty: Sequence[bool]) -> list[Any]:
    """The records whose `empty` flag is False; logs how many were left out."""
    kept = [r for r, is_empty in zip(records, empty, strict=True) if not is_empty]
    log.info(
        "%s: left out %d of %d training images whose target is empty (as the authors' release does)",
        dataset,
        len(records) - len(kept),
        len(records),
    )
    return kept


def extrema(png: bytes) -> list[tuple[int, int]]:
    """(min, max) of every band of a PNG's stored values (palette indices, not colours)."""
    with Image.open(io.BytesIO(png)) as im:
        values = im.getextrema()
    return list(values) if isinstance(values[0], tuple) else [values]


def single_valued(png: bytes) -> bool:
    return all(low == high for low, high in extrema(png))


def scan_pngs(
    kind: str,
    members: Sequence[Sequence[tuple[Store, str]]],
    is_empty: Callable[[list[bytes]], bool],
    cache_dir: str | Path | None = None,
) -> list[bool]:
    """`is_empty(contents of an item's members)` for every item, from the cache when it has them.

    An item whose files cannot be read counts as not empty: loading it later skips or raises as
    for any corrupt file.
    """
    digest = hashlib.sha256(f"{kind} v{RULES_VERSION}".encode())
    for item in members:
        for store, name in item:
            digest.update(_fingerprint(store, name).encode())
    cache = (
        Path(cache_dir or default_cache_dir() / "empty_targets") / f"{kind}-{digest.hexdigest()[:24]}.json"
    )
    if cache.is_file():
        try:
            flags = json.loads(cache.read_text())
            if isinstance(flags, list) and len(flags) == len(members):
                return [bool(f) for f in flags]
        except (OSError, ValueError):
            pass  # unreadable: scan again
    log.info(
        "%s: looking for empty targets in the label PNGs of %d images (once; cached in %s)",
        kind,
        len(members),
        cache,
    )

    def check(item: Sequence[tuple[Store, str]]) -> bool:
        try:
            return is_empty([store.read(name) for store, name in item])
        except _READ_ERRORS:
            return False

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        flags = list(pool.map(check, members, chunksize=64))
    write_json(cache, flags)
    return flags


def _fingerprint(store: Store, name: str) -> str:
    if isinstance(store, ZipReader):
        info = store.zipfile.getinfo(name)
        return f"{name}:{info.file_size}:{info.CRC:08x};"
    stat = (Path(str(store)) / name).stat()
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns};"
