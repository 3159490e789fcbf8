"""Decode images and annotation PNGs read from a store; unreadable files raise CorruptFileError.

An image above Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`: a warning above it, an
error above twice it) counts as unreadable; `dataset.max_image_pixels` sets the limit while a dataset
reads (`pixel_limit`), so that very large legitimate images (aerial tiles) can be read.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from eomt.data.zipreader import Store
from eomt.errors import DataError

# What a truncated or damaged member raises: zip CRC/format errors, and the decoders' errors.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, SyntaxError)


class CorruptFileError(DataError):
    """A file inside a dataset could not be read or decoded."""

    def __init__(self, name: str, store: Store | None = None, reason: str = ""):
        # One argument: the message as a DataLoader worker's error is re-raised in the main process.
        super().__init__(name if store is None else f"{name} in {store}: {reason}")
        self.name = name


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels` inside the block (None: as it is)."""
    if max_pixels is None:
        yield
        return
    if max_pixels < 1:
        raise DataError(f"dataset.max_image_pixels={max_pixels} must be a positive number of pixels, or null")
    before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, int(max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def read_image(store: Store, name: str) -> torch.Tensor:
    """An RGB image as a uint8 tensor (3, H, W), whatever its mode (grey, CMYK, palette)."""
    try:
        with Image.open(io.BytesIO(store.read(name))) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise CorruptFileError(
            name,
            store,
            f"DecompressionBombError: {e} If the image is legitimate, raise dataset.max_image_pixels "
            f"(now {Image.MAX_IMAGE_PIXELS}; images above twice it are refused)",
        ) from e
    except _READ_ERRORS as e:
        raise CorruptFileError(name, store, f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_png(store: Store, name: str) -> np.ndarray:
    """An annotation PNG's stored values (palette indices, not colours): (H, W) or (H, W, C)."""
    try:
        with Image.open(io.BytesIO(store.read(name))) as im:
            im.load()
            return np.asarray(im)
    except (Image.DecompressionBombError, *_READ_ERRORS) as e:
        raise CorruptFileError(name, store, f"{type(e).__name__}: {e}") from e


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic segment ids from an (H, W, 3) PNG: R + 256 G + 256^2 B (0 = void)."""
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
