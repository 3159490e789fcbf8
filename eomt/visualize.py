"""Overlay images: predictions (and ground truth) painted on the image, with class names.

Every painter returns uint8 (3,H,W) numpy arrays, ready for TensorBoard's `add_image` or, after
`.transpose(1, 2, 0)`, for PIL. `OverlayCollector` is an evaluation callback that keeps the first
N images as [prediction | ground truth] pairs.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

MIN_LABELLED_PIXELS = 64  # segments smaller than this (at the drawn size) get no text
MIN_SIDE = 256  # smaller images are enlarged (whole pixel multiples) so that labels stay legible


def class_colors(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8: well-separated hues (golden-ratio steps), fixed per class id."""
    colors = []
    for c in range(num_classes):
        hue = (c * 0.618033988749895) % 1.0
        saturation, value = (0.65, 0.95) if c % 2 == 0 else (0.85, 0.75)
        colors.append([round(255 * v) for v in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.array(colors, dtype=np.uint8).reshape(-1, 3)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _instance_color(base: np.ndarray, index: int) -> np.ndarray:
    """Shades of the class colour, so neighbouring instances of one class stay apart."""
    factor = 0.6 + 0.4 * ((index * 0.37) % 1.0)
    return np.clip(base.astype(np.float32) * factor + 30 * (1 - factor), 0, 255).astype(np.uint8)


def _label_position(mask: np.ndarray) -> tuple[int, int]:
    """A pixel of the mask near its centroid (the centroid itself may lie outside)."""
    ys, xs = np.nonzero(mask)
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(xs[nearest]), int(ys[nearest])


def paint(
    image: torch.Tensor | np.ndarray,
    regions: Sequence[tuple[np.ndarray, np.ndarray, str]],
    alpha: float = 0.55,
) -> np.ndarray:
    """Blend (mask (H,W) bool, colour (3,) uint8, text) regions over a uint8 (3,H,W) image, draw
    their outlines, and write each text at its region. An image with a side under `MIN_SIDE` is
    drawn enlarged by a whole factor (pixels repeated), so the text does not cover it."""
    image = _numpy(image)
    factor = upscale_factor(*image.shape[-2:])
    if factor > 1:
        image = _enlarge(image, factor)
        regions = [(_enlarge(mask, factor), color, text) for mask, color, text in regions]
    canvas = image.astype(np.float32).transpose(1, 2, 0).copy()
    outline = np.zeros(canvas.shape[:2], dtype=bool)
    for mask, color, _ in regions:
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color.astype(np.float32)
        edge = mask.copy()
        edge[1:-1, 1:-1] &= ~(mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
        outline |= edge
    canvas[outline] *= 0.35
    result = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    font = ImageFont.load_default()
    for mask, _, text in regions:
        if text and mask.sum() >= MIN_LABELLED_PIXELS:
            x, y = _label_position(mask)
            left, top, right, bottom = draw.textbbox((x, y), text, font=font, anchor="mm")
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
            draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor="mm")
    return np.asarray(result).transpose(2, 0, 1).copy()


def upscale_factor(height: int, width: int) -> int:
    """The whole factor by which an overlay of this size is drawn (1 when its shorter side >= MIN_SIDE)."""
    return max(1, -(-MIN_SIDE // max(1, min(height, width))))


def _enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    return array.repeat(factor, axis=-2).repeat(factor, axis=-1)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)


def overlay_panoptic(image, id_map, segments: Sequence[dict], class_names: Sequence[str]) -> np.ndarray:
    """Panoptic map (0 = void) + `[{"id", "category_id"}]` over the image."""
    id_map = _numpy(id_map)
    colors = class_colors(
        max(len(class_names), 1 + max((int(s["category_id"]) for s in segments), default=0))
    )
    regions = []
    for index, s in enumerate(segments):
        label = int(s["category_id"])
        color = _instance_color(colors[label], index) if s.get("isthing", True) else colors[label]
        regions.append((id_map == s["id"], color, _name(class_names, label)))
    return paint(image, regions)


def overlay_semantic(image, semantic, class_names: Sequence[str], ignore_index: int = 255) -> np.ndarray:
    """Semantic map (class ids, `ignore_index` left unpainted) over the image."""
    semantic = _numpy(semantic)
    colors = class_colors(max(len(class_names), int(semantic[semantic != ignore_index].max(initial=0)) + 1))
    labels = [int(c) for c in np.unique(semantic) if c != ignore_index]
    return paint(image, [(semantic == c, colors[c], _name(class_names, c)) for c in labels])


def overlay_instances(
    image, masks, labels, scores, class_names: Sequence[str], score_threshold: float = 0.5
) -> np.ndarray:
    """Instances scoring at least `score_threshold`, lowest score first so the best lie on top."""
    masks, labels, scores = _numpy(masks).astype(bool), _numpy(labels), _numpy(scores)
    colors = class_colors(max(len(class_names), int(labels.max(initial=0)) + 1))
    order = [i for i in np.argsort(scores) if scores[i] >= score_threshold]
    regions = [
        (
            masks[i],
            _instance_color(colors[labels[i]], n),
            f"{_name(class_names, int(labels[i]))} {scores[i]:.2f}",
        )
        for n, i in enumerate(order)
    ]
    return paint(image, regions)


# ---------------------------------------------------------------------------------------------
# Prediction / ground-truth pairs per task (the prediction formats of eomt.inference.predictor)


def _panoptic_pair(
    image, prediction: dict, sample: dict, class_names
) -> tuple[np.ndarray, np.ndarray | None]:
    predicted = overlay_panoptic(image, prediction["id_map"], prediction["segments"], class_names)
    target = sample.get("panoptic")
    truth = overlay_panoptic(image, target["id_map"], target["segments"], class_names) if target else None
    return predicted, truth


def _semantic_pair(
    image, prediction: dict, sample: dict, class_names
) -> tuple[np.ndarray, np.ndarray | None]:
    predicted = overlay_semantic(image, prediction["semantic"], class_names)
    truth = (
        overlay_semantic(image, sample["semantic"], class_names)
        if sample.get("semantic") is not None
        else None
    )
    return predicted, truth


def _instance_pair(
    image, prediction: dict, sample: dict, class_names
) -> tuple[np.ndarray, np.ndarray | None]:
    predicted = overlay_instances(
        image, prediction["masks"], prediction["labels"], prediction["scores"], class_names
    )
    instances = sample.get("instances")
    if instances is None:
        return predicted, None
    height, width = predicted.shape[-2:]
    masks = np.zeros((len(instances), height, width), dtype=bool)
    if instances:
        masks = mask_utils.decode([a["segmentation"] for a in instances]).transpose(2, 0, 1).astype(bool)
    labels = np.array([a["category_id"] for a in instances], dtype=np.int64)
    truth = overlay_instances(image, masks, labels, np.ones(len(instances)), class_names, score_threshold=0)
    return predicted, truth


PAIR_PAINTERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray | None]]] = {
    "panoptic": _panoptic_pair,
    "semantic": _semantic_pair,
    "instance": _instance_pair,
}


def overlay_prediction(
    task: str, image, prediction: dict, sample: dict | None, class_names: Sequence[str]
) -> np.ndarray:
    """[prediction | ground truth] side by side (just the prediction when the sample has none)."""
    if task not in PAIR_PAINTERS:
        raise ValueError(f"task={task} has no overlay painter; use one of {'|'.join(PAIR_PAINTERS)}")
    predicted, truth = PAIR_PAINTERS[task](image, prediction, sample or {}, class_names)
    if truth is None:
        return predicted
    gap = np.full((3, predicted.shape[1] + TITLE_HEIGHT, 4), 255, dtype=np.uint8)
    return np.concatenate([_titled(predicted, "prediction"), gap, _titled(truth, "ground truth")], axis=2)


TITLE_HEIGHT = 16


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """The panel under a white band naming it."""
    band = Image.new("RGB", (panel.shape[2], TITLE_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(band).text(
        (4, TITLE_HEIGHT // 2), title, fill=(0, 0, 0), font=ImageFont.load_default(), anchor="lm"
    )
    return np.concatenate([np.asarray(band).transpose(2, 0, 1), panel], axis=1)


class OverlayCollector:
    """Evaluation callback keeping [prediction | ground truth] overlays of this rank's first images."""

    def __init__(self, task: str, class_names: Sequence[str] | None, max_images: int = 4):
        """`class_names=None`: label the regions with class ids."""
        if task not in PAIR_PAINTERS:
            raise ValueError(f"task={task} has no overlay painter; use one of {'|'.join(PAIR_PAINTERS)}")
        self.task = task
        self.class_names = list(class_names or [])
        self.max_images = max_images
        self.overlays: list[tuple[Any, np.ndarray]] = []  # (image_id, uint8 (3,H,W))

    def __call__(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            if len(self.overlays) >= self.max_images:
                return
            overlay = overlay_prediction(self.task, sample["image"], prediction, sample, self.class_names)
            self.overlays.append((sample["image_id"], overlay))
