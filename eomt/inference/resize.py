"""Geometry of inference: fit images to the network's crop and map its outputs back.

Instance / panoptic ("letterbox"): scale so the image fits inside the crop (longer side), pad
bottom/right, run; logits are upsampled to the crop, the padding is cut, then they are resized to
the original image. Semantic ("sliding windows"): scale so the image covers the crop (shorter
side), cut crop-sized windows whose overlap is split evenly, average the windows' per-pixel
scores where they overlap, resize back.

The pixels are resized as the release does, with PIL's BILINEAR on the uint8 image (its own
antialiased fixed-point kernel; torch's interpolate gives other pixels). `letterbox` and
`sliding_windows` run on the CPU, in the data-loading workers (`eomt.data.collate.collate_eval`)
or wherever a caller prepares images; mapping outputs back runs on the logits' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Size = tuple[int, int]


def fit_inside(size: Sequence[int], crop: Sequence[int]) -> Size:
    """Largest size with the aspect of `size` that fits in `crop` (rounded like the release)."""
    factor = min(crop[0] / size[0], crop[1] / size[1])
    return round(size[0] * factor), round(size[1] * factor)


def cover(size: Sequence[int], crop: Sequence[int]) -> Size:
    """Smallest size with the aspect of `size` that covers `crop`."""
    factor = max(crop[0] / size[0], crop[1] / size[1])
    return round(size[0] * factor), round(size[1] * factor)


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """uint8 (3,H,W) -> uint8 (3,h,w) on the CPU, by PIL's `Image.resize(..., Image.BILINEAR)`."""
    size = (int(size[0]), int(size[1]))
    image = image.cpu()
    if tuple(image.shape[-2:]) == size:
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    resized = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(resized.copy()).permute(2, 0, 1).contiguous()


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (N,h,w) or (B,N,h,w) maps."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    if logits.numel() == 0:  # e.g. no query kept: interpolate refuses empty inputs
        return logits.new_zeros((*logits.shape[:-2], *size))
    if logits.dim() == 3:
        return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class NetworkInput:
    """One image made ready for the network: crop-sized uint8 windows and where they sit.

    `crops` (N,3,*crop): the padded letterbox (N = 1) or the sliding windows; `origins`: the
    (top, left) of each crop in the resized image; `resized_size`: the image after resizing;
    `orig_size`: the image as stored (predictions are made at this size).
    """

    crops: torch.Tensor
    origins: tuple[tuple[int, int], ...]
    resized_size: Size
    orig_size: Size

    @property
    def crop(self) -> Size:
        return int(self.crops.shape[-2]), int(self.crops.shape[-1])


def _size(size: Sequence[int]) -> Size:
    return int(size[0]), int(size[1])


def letterbox(image: torch.Tensor, crop: Sequence[int]) -> NetworkInput:
    """uint8 image (3,H,W) -> the image resized to fit inside `crop`, zero-padded bottom/right."""
    crop, orig = _size(crop), _size(image.shape[-2:])
    resized_size = fit_inside(orig, crop)
    padded = torch.zeros((1, 3, *crop), dtype=torch.uint8)
    padded[0, :, : resized_size[0], : resized_size[1]] = resize_image(image, resized_size)
    return NetworkInput(padded, ((0, 0),), resized_size, orig)


def unletterbox(logits: torch.Tensor, box: NetworkInput) -> torch.Tensor:
    """Network maps (N,h,w) of one letterboxed image -> (N,H,W) at its original size."""
    at_crop = resize_logits(logits, box.crop)
    return resize_logits(at_crop[:, : box.resized_size[0], : box.resized_size[1]], box.orig_size)


def window_starts(length: int, window: int) -> list[int]:
    """Starts of the fewest `window`-long windows covering `length`, overlap split evenly.

    Integer form of the release's `int(j * (window - overlap / (n - 1)))`, which is exact
    where the float form can fall one pixel short of the end.
    """
    if length <= window:
        return [0]
    n = math.ceil(length / window)
    return [j * (length - window) // (n - 1) for j in range(n)]


def sliding_windows(image: torch.Tensor, crop: Sequence[int]) -> NetworkInput:
    """uint8 image (3,H,W) -> uint8 crop-sized windows covering the image resized to cover `crop`."""
    crop, orig = _size(crop), _size(image.shape[-2:])
    resized_size = cover(orig, crop)
    resized = resize_image(image, resized_size)
    origins = tuple(
        (top, left)
        for top in window_starts(resized_size[0], crop[0])
        for left in window_starts(resized_size[1], crop[1])
    )
    crops = torch.stack([resized[:, top : top + crop[0], left : left + crop[1]] for top, left in origins])
    return NetworkInput(crops, origins, resized_size, orig)


def merge_windows(scores: torch.Tensor, windows: NetworkInput) -> torch.Tensor:
    """Per-window maps (N,C,*crop) of one image -> (C,H,W): overlaps averaged, resized to the original."""
    sums = scores.new_zeros((scores.shape[1], *windows.resized_size))
    counts = scores.new_zeros((1, *windows.resized_size))
    h, w = windows.crop
    for (top, left), window_scores in zip(windows.origins, scores, strict=True):
        sums[:, top : top + h, left : left + w] += window_scores
        counts[:, top : top + h, left : left + w] += 1
    return resize_logits(sums / counts, windows.orig_size)
