"""Geometry of inference: fit images to the network's crop and map its outputs back.

Instance / panoptic ("letterbox"): scale so the image fits inside the crop (longer side), pad
bottom/right, run; logits are upsampled to the crop, the padding is cut, then they are resized to
the original image. Semantic ("sliding windows"): scale so the image covers the crop (shorter
side), cut crop-sized windows whose overlap is split evenly, average the windows' per-pixel
scores where they overlap, resize back. Everything runs batched on the images' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """uint8 (3,H,W) -> float (3,h,w) in [0,1], resized like PIL's BILINEAR (antialiased) and
    quantised back to 8 bits as the release does, so the network sees the same pixels."""
    resized = F.interpolate(
        image[None].float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].round().clamp(0, 255) / 255.0


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
class Letterbox:
    """Where one image sits in the padded crop."""

    orig_size: Size
    resized_size: Size
    crop: Size


def letterbox_batch(
    images: Sequence[torch.Tensor], crop: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, list[Letterbox]]:
    """uint8 images (3,H,W) of any sizes -> float batch (B,3,*crop) in [0,1], zero-padded bottom/right."""
    crop = (int(crop[0]), int(crop[1]))
    batch = torch.zeros((len(images), 3, *crop), device=device)
    boxes = []
    for i, image in enumerate(images):
        orig = (int(image.shape[-2]), int(image.shape[-1]))
        resized = fit_inside(orig, crop)
        batch[i, :, : resized[0], : resized[1]] = resize_image(image.to(device, non_blocking=True), resized)
        boxes.append(Letterbox(orig, resized, crop))
    return batch, boxes


def unletterbox(logits: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """Network maps (N,h,w) of one image -> (N,H,W) at its original size."""
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


@dataclass(frozen=True)
class Window:
    image: int  # index of the image in the batch
    top: int
    left: int


@dataclass(frozen=True)
class WindowLayout:
    windows: list[Window]
    scaled_sizes: list[Size]  # each image after scaling to cover the crop
    orig_sizes: list[Size]
    crop: Size


def sliding_windows(
    images: Sequence[torch.Tensor], crop: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, WindowLayout]:
    """uint8 images (3,H,W) -> float windows (N,3,*crop) in [0,1] covering every scaled image."""
    crop = (int(crop[0]), int(crop[1]))
    crops, windows, scaled_sizes, orig_sizes = [], [], [], []
    for i, image in enumerate(images):
        orig = (int(image.shape[-2]), int(image.shape[-1]))
        scaled = cover(orig, crop)
        resized = resize_image(image.to(device, non_blocking=True), scaled)
        for top in window_starts(scaled[0], crop[0]):
            for left in window_starts(scaled[1], crop[1]):
                crops.append(resized[:, top : top + crop[0], left : left + crop[1]])
                windows.append(Window(i, top, left))
        scaled_sizes.append(scaled)
        orig_sizes.append(orig)
    return torch.stack(crops), WindowLayout(windows, scaled_sizes, orig_sizes, crop)


def merge_windows(scores: torch.Tensor, layout: WindowLayout) -> list[torch.Tensor]:
    """Per-window maps (N,C,*crop) -> per-image (C,H,W): overlaps averaged, resized to the original."""
    channels = scores.shape[1]
    sums = [scores.new_zeros((channels, *size)) for size in layout.scaled_sizes]
    counts = [scores.new_zeros((1, *size)) for size in layout.scaled_sizes]
    h, w = layout.crop
    for window, window_scores in zip(layout.windows, scores, strict=True):
        sums[window.image][:, window.top : window.top + h, window.left : window.left + w] += window_scores
        counts[window.image][:, window.top : window.top + h, window.left : window.left + w] += 1
    return [resize_logits(s / c, orig) for s, c, orig in zip(sums, counts, layout.orig_sizes, strict=True)]
