"""Overlay images: predictions (and ground truth) painted on the image, with class names.

Every painter returns uint8 (3,H,W) numpy arrays, ready for TensorBoard's `add_image` or, after
`.transpose(1, 2, 0)`, for PIL. `OverlayCollector` is an evaluation callback that keeps the first
N images as [prediction | ground truth] pairs.

Every segment is named: its label goes inside it (at least half of the label's box on the segment,
the smallest segments placed first, no label over another); a segment with no such place is listed
in a legend under the picture, with its colour, as too small to label in place.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

MIN_INSIDE = 0.5  # share of a label's box that must lie on its segment
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


def _box_sums(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H-height+1, W-width+1): how many pixels of `mask` each box of that size (by its top left) covers."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (
        integral[height:, width:]
        - integral[:-height, width:]
        - integral[height:, :-width]
        + integral[:-height, :-width]
    )


def place_label(
    mask: np.ndarray, occupied: np.ndarray, size: tuple[int, int], min_inside: float = MIN_INSIDE
) -> tuple[int, int] | None:
    """Top left (x, y) of a `size` (width, height) box on `mask`, clear of `occupied`, as close to the
    mask's centre as it can be, with at least `min_inside` of it on the mask; None where none is."""
    width, height = size
    img_h, img_w = mask.shape
    if width > img_w or height > img_h or not mask.any():
        return None
    on_mask = _box_sums(mask, height, width)
    clear = _box_sums(occupied, height, width) == 0
    for need in (1.0, min_inside):  # wholly on the segment if it can be, else partly
        ys, xs = np.nonzero(clear & (on_mask >= need * width * height))
        if len(ys):
            my, mx = np.nonzero(mask)
            centre_y, centre_x = my.mean() - height / 2, mx.mean() - width / 2
            best = np.argmin((ys - centre_y) ** 2 + (xs - centre_x) ** 2)
            return int(xs[best]), int(ys[best])
    return None


LEGEND_TITLE = "too small to label in place:"


def layout_labels(
    regions: Sequence[tuple[np.ndarray, np.ndarray, str]], draw: ImageDraw.ImageDraw, font
) -> tuple[list[tuple[int, int, tuple[int, int], str, int, int]], list[tuple[np.ndarray, str]]]:
    """Where each region's text goes: ([(x, y, (width, height), text, text left, text top)], [(colour,
    text)] of the regions that get no place), smallest regions first, no two boxes touching."""
    height, width = regions[0][0].shape if regions else (0, 0)
    occupied = np.zeros((height, width), dtype=bool)
    placed, unlabelled = [], []
    for index in sorted(range(len(regions)), key=lambda i: int(regions[i][0].sum())):
        mask, color, text = regions[index]
        if not text or not mask.any():
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, anchor="lt")
        size = (right - left + 2, bottom - top + 2)  # the text on a 1-pixel black frame
        spot = place_label(mask, occupied, size)
        if spot is None:
            unlabelled.append((color, text))
            continue
        x, y = spot
        placed.append((x, y, size, text, left, top))
        occupied[max(0, y - 1) : y + size[1] + 1, max(0, x - 1) : x + size[0] + 1] = True
    return placed, unlabelled


def paint(
    image: torch.Tensor | np.ndarray,
    regions: Sequence[tuple[np.ndarray, np.ndarray, str]],
    alpha: float = 0.55,
) -> np.ndarray:
    """Blend (mask (H,W) bool, colour (3,) uint8, text) regions over a uint8 (3,H,W) image, draw
    their outlines, and write each text on its region (`layout_labels`), or, where a region has no
    room for it, in a legend band under the picture. An image with a side under `MIN_SIDE` is drawn
    enlarged by a whole factor (pixels repeated), so the text does not cover it."""
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
    placed, unlabelled = layout_labels(regions, draw, font)
    for x, y, size, text, left, top in placed:
        draw.rectangle((x, y, x + size[0] - 1, y + size[1] - 1), fill=(0, 0, 0))
        draw.text((x + 1 - left, y + 1 - top), text, fill=(255, 255, 255), font=font, anchor="lt")
    picture = np.asarray(result).transpose(2, 0, 1)
    if unlabelled:
        picture = np.concatenate([picture, _legend(unlabelled, picture.shape[2])], axis=1)
    return picture.copy()


def _legend(entries: Sequence[tuple[np.ndarray, str]], width: int) -> np.ndarray:
    """A white band: LEGEND_TITLE, then a colour swatch and the name of each segment (repeats counted)."""
    counts: dict[str, list] = {}
    for color, text in entries:
        counts.setdefault(text, [color, 0])[1] += 1
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = 14
    items = [(LEGEND_TITLE, None)] + [
        (f"{text} x{n}" if n > 1 else text, color) for text, (color, n) in counts.items()
    ]
    rows: list[list[tuple[int, str, np.ndarray | None]]] = [[]]
    x = 4
    for text, color in items:
        item_width = int(probe.textlength(text, font=font)) + (14 if color is not None else 0) + 10
        if rows[-1] and x + item_width > width:
            rows.append([])
            x = 4
        rows[-1].append((x, text, color))
        x += item_width
    band = Image.new("RGB", (width, line_height * len(rows) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for r, row in enumerate(rows):
        y = 2 + r * line_height
        for x, text, color in row:
            if color is not None:
                draw.rectangle(
                    (x, y + 2, x + 9, y + 11), fill=tuple(int(c) for c in color), outline=(0, 0, 0)
                )
                x += 14
            draw.text((x, y + line_height // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(band).transpose(2, 0, 1)


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
    height = max(predicted.shape[1], truth.shape[1])  # a legend under one of them makes it taller
    predicted, truth = (
        np.pad(p, ((0, 0), (0, height - p.shape[1]), (0, 0)), constant_values=255) for p in (predicted, truth)
    )
    gap = np.full((3, height + TITLE_HEIGHT, 4), 255, dtype=np.uint8)
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
