"""The training augmentation (REFERENCE §2), as the release's torchvision v2 transforms do it.

Drop crowd segments; photometric jitter (optional); horizontal flip; large-scale jitter to the
crop size (image: antialiased bilinear; masks: torch's legacy nearest); pad bottom/right to the
crop; random crop; drop masks left empty; when none remains, draw the augmentation again (at most
`max_draws` times, where the release has no bound: docs/differences.md). Random numbers come from
torch's global generator, drawn in the release's order, which eomt.data.sampler.SeededSamples
seeds per sample: a given seed gives the same samples, and the release's pixels for the same draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


class ColorJitter:
    """The release's photometric jitter, by torchvision's functional ops on uint8.

    Brightness (multiplied by a factor in 1 +- `brightness_delta`/255); then, in an order drawn
    with probability 0.5 each way, contrast before (saturation, hue) or after. Each of the four
    ops fires with probability 0.5; factors are uniform in their ranges, hue in +-degrees/360 of
    a turn in HSV. The draws come from torch's global generator in the release's order.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta_degrees: float = 18.0,
    ):
        self.brightness_range = (1 - brightness_delta / 255.0, 1 + brightness_delta / 255.0)
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_range = (-hue_delta_degrees / 360.0, hue_delta_degrees / 360.0)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.brightness(image)
        if _coin():
            return self.saturation_and_hue(self.contrast(image))
        return self.contrast(self.saturation_and_hue(image))

    def brightness(self, image: torch.Tensor) -> torch.Tensor:
        if _coin():
            image = TF.adjust_brightness(image, _uniform(*self.brightness_range))
        return image

    def contrast(self, image: torch.Tensor) -> torch.Tensor:
        if _coin():
            image = TF.adjust_contrast(image, _uniform(*self.contrast_range))
        return image

    def saturation_and_hue(self, image: torch.Tensor) -> torch.Tensor:
        if _coin():
            image = TF.adjust_saturation(image, _uniform(*self.saturation_range))
        if _coin():
            image = TF.adjust_hue(image, _uniform(*self.hue_range))
        return image


class TrainTransform:
    """Map a sample to `image` (3, crop_h, crop_w) uint8, `masks`, `labels`, `is_crowd` (all False).

    `scale_range` multiplies the scale that fits the image inside the crop (large-scale jitter).
    Evaluation fields are dropped; `skipped` (see eomt.data.base) is kept.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        scale_range: Sequence[float],
        color_jitter: bool = False,
        flip_prob: float = 0.5,
        max_draws: int = 100,
    ):
        if len(crop_size) != 2 or len(scale_range) != 2:
            raise ValueError(f"crop_size {crop_size} and scale_range {scale_range} must each be two numbers")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.color_jitter = ColorJitter() if color_jitter else None
        self.flip_prob = flip_prob
        self.max_draws = max(1, max_draws)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
            f"color_jitter={self.color_jitter is not None})"
        )

    def __call__(self, sample: dict) -> dict:
        keep = ~sample["is_crowd"]
        image, masks, labels = sample["image"], sample["masks"][keep], sample["labels"][keep]
        for _ in range(self.max_draws):
            out_image, out_masks = self._draw(image, masks)
            valid = _nonempty(out_masks)
            if valid.any() or not _nonempty(masks).any():
                break
        else:
            warnings.warn(
                f"no mask survived {self.max_draws} crops of {sample.get('file_name')}", stacklevel=2
            )
        return {
            "image": out_image,
            "masks": out_masks[valid],
            "labels": labels[valid],
            "is_crowd": torch.zeros(int(valid.sum()), dtype=torch.bool),
            "skipped": sample.get("skipped", 0),
        }

    def _draw(self, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw of jitter, flip, scale, pad and crop (the release's torchvision v2 draws, in order)."""
        if self.color_jitter is not None:
            image = self.color_jitter(image)
        flip = bool(torch.rand(1) < self.flip_prob)
        if flip:
            image = image.flip(-1)
        (h, w), (crop_h, crop_w) = image.shape[1:], self.crop_size
        new_h, new_w = _jittered_size(h, w, self.crop_size, self.scale_range)
        # RandomCrop after padding to the crop draws an offset only along a side longer than the crop
        top = int(torch.randint(0, new_h - crop_h + 1, ())) if new_h > crop_h else 0
        left = int(torch.randint(0, new_w - crop_w + 1, ())) if new_w > crop_w else 0
        rows = _source_indices(top, crop_h, new_h, h)
        cols = _source_indices(left, crop_w, new_w, w)
        if flip:
            cols = w - 1 - cols

        resized = TF.resize(image, [new_h, new_w], antialias=True)
        out_image = torch.zeros(3, crop_h, crop_w, dtype=torch.uint8)
        out_image[:, : len(rows), : len(cols)] = resized[:, top : top + len(rows), left : left + len(cols)]
        out_masks = torch.zeros(len(masks), crop_h, crop_w, dtype=torch.bool)
        # NumPy's take gathers several times faster than torch's advanced indexing here.
        gathered = np.take(np.take(masks.numpy(), rows.numpy(), axis=1), cols.numpy(), axis=2)
        out_masks[:, : len(rows), : len(cols)] = torch.from_numpy(gathered)
        return out_image, out_masks


def _jittered_size(h: int, w: int, crop: Sequence[int], scale_range: Sequence[float]) -> tuple[int, int]:
    """Large-scale jitter as torchvision's ScaleJitter computes it (float32, truncated): a uniform
    scale times the one that fits the image inside the crop."""
    scale = scale_range[0] + torch.rand(1) * (scale_range[1] - scale_range[0])
    ratio = min(crop[0] / h, crop[1] / w) * scale
    return max(1, int(h * ratio)), max(1, int(w * ratio))


def _source_indices(start: int, length: int, resized: int, original: int) -> torch.Tensor:
    """Source pixels that torch's legacy "nearest" resizing (original -> resized; what torchvision
    resizes masks with) puts at positions start .. start + length of the resized image, clipped to
    it: floor(position * (original / resized)) in float32. The masks are cropped and resized in
    one gather, never materialised at the resized size."""
    positions = torch.arange(start, min(start + length, resized))
    scale = torch.tensor(original, dtype=torch.float32) / resized
    return (positions.float() * scale).floor().long().clamp(max=original - 1)


def _nonempty(masks: torch.Tensor) -> torch.Tensor:
    """Which of the (N, H, W) bool masks have a pixel set (a uint8 max: far faster than `any`)."""
    return masks.view(torch.uint8).flatten(1).amax(1).bool() if len(masks) else masks.new_zeros(0)


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


def _uniform(low: float, high: float) -> float:
    return torch.empty(1).uniform_(low, high).item()
