"""Decode images and annotation PNGs read from a store; unreadable files raise CorruptFileError."""

from __future__ import annotations

import io
import zipfile
import zlib

import numpy as np
import torch
from PIL import Image

from eomt.data.zipreader import Store

# What a truncated or damaged member raises: zip CRC/format errors, and the decoders' errors.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, SyntaxError)


class CorruptFileError(Exception):
    """A file inside a dataset could not be read or decoded."""

    def __init__(self, name: str, store: Store, reason: str):
        super().__init__(f"{name} in {store}: {reason}")
        self.name = name


def read_image(store: Store, name: str) -> torch.Tensor:
    """An RGB image as a uint8 tensor (3, H, W), whatever its mode (grey, CMYK, palette)."""
    try:
        with Image.open(io.BytesIO(store.read(name))) as im:
            rgb = np.asarray(im.convert("RGB"))
    except _READ_ERRORS as e:
        raise CorruptFileError(name, store, f"{type(e).__name__}: {e}") from e
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_png(store: Store, name: str) -> np.ndarray:
    """An annotation PNG's stored values (palette indices, not colours): (H, W) or (H, W, C)."""
    try:
        with Image.open(io.BytesIO(store.read(name))) as im:
            im.load()
            return np.asarray(im)
    except _READ_ERRORS as e:
        raise CorruptFileError(name, store, f"{type(e).__name__}: {e}") from e


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic segment ids (H, W) int32 from an (H, W, 3) PNG: R + 256 G + 256^2 B (0 = void)."""
    rgb = np.asarray(rgb).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def png_ids(image: Image.Image) -> np.ndarray:
    """`rgb_to_id` of an RGB PIL image, read as R, G, B, pad bytes: one little-endian int32 per pixel."""
    if image.mode != "RGB":
        return rgb_to_id(np.asarray(image.convert("RGB")))
    packed = np.frombuffer(image.tobytes("raw", "RGBX"), dtype="<u4").reshape(image.height, image.width)
    return (packed & 0xFFFFFF).view(np.int32)
