"""The COCO panoptic annotation format, shared by COCO and users' own data.

A JSON with `images`, `annotations` (one per image: PNG `file_name` and `segments_info`) and
`categories` (`id`, `name`, `isthing`), plus one PNG per image whose pixel value
R + 256 G + 256^2 B is a segment id (0 = void). Category ids become contiguous class ids with
things first, each group in id order (COCO's 133 classes: 80 things, then 53 stuff).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from eomt.data.base import SegmentationDataset, check_matches
from eomt.data.decode import read_image, read_png, rgb_to_id
from eomt.data.targets import panoptic_fields, semantic_fields
from eomt.data.zipreader import Store
from eomt.errors import DataError


def things_first(categories: Sequence[dict]) -> tuple[dict[int, int], list[str], list[int]]:
    """Map category ids to contiguous ids, things first: (id -> contiguous, names, thing ids)."""
    ordered = sorted(categories, key=lambda c: (not c.get("isthing", 1), c["id"]))
    mapping = {int(c["id"]): i for i, c in enumerate(ordered)}
    return mapping, [c["name"] for c in ordered], [i for i, c in enumerate(ordered) if c.get("isthing", 1)]


class JsonCategoriesDataset(SegmentationDataset):
    """A dataset whose classes are the categories of its annotation JSON: `class_names` (the config's, or
    None) must be those categories in contiguous order; `index()` sets `self.class_names` and calls
    `check_class_names(source)`."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[dict], dict] | None = None,
        on_corrupt: str = "skip",
        class_names: Sequence[str] | None = None,
        skip_empty: bool = False,
    ):
        self.configured_class_names = class_names
        super().__init__(root, split, transform=transform, on_corrupt=on_corrupt, skip_empty=skip_empty)

    def check_class_names(self, source: str) -> None:
        found, expected = self.class_names, self.configured_class_names
        if expected is not None and list(expected) != found:
            raise DataError(
                f"{self.name}: the categories of {source} ({len(found)}: {', '.join(found[:6])}"
                f"{', ...' if len(found) > 6 else ''}) differ from the configured class_names "
                f"({len(expected)}: {', '.join(list(expected)[:6])}{', ...' if len(expected) > 6 else ''})"
            )


class PanopticJson(NamedTuple):
    """A COCO-panoptic-format JSON (`source` names it in messages) and the stores of its files."""

    annotations: dict
    source: str
    images: Store
    image_prefix: str  # the folder of the JSON's image file names inside `images`
    masks: Store
    mask_prefix: str


def index_panoptic_json(dataset: str, panoptic: PanopticJson, mapping: dict[int, int]) -> list[dict]:
    """One record per annotated image, checked against the stores' file lists (no pixel decoding)."""
    annotations, source, images, image_prefix, masks, mask_prefix = panoptic
    image_by_id = {img["id"]: img for img in annotations["images"]}
    records, unknown_images, unknown_categories = [], [], set()
    for ann in annotations["annotations"]:
        image = image_by_id.get(ann["image_id"])
        if image is None:
            unknown_images.append(str(ann["image_id"]))
            continue
        segments = []
        for seg in ann["segments_info"]:
            if seg["category_id"] not in mapping:
                unknown_categories.add(seg["category_id"])
                continue
            segments.append(
                {
                    "id": int(seg["id"]),
                    "category_id": mapping[seg["category_id"]],
                    "iscrowd": int(seg.get("iscrowd", 0)),
                    "area": int(seg.get("area", 0)),
                }
            )
        records.append(
            {
                "image": image_prefix + image["file_name"],
                "mask": mask_prefix + ann["file_name"],
                "image_id": image["id"],
                "file_name": image["file_name"],
                "height": int(image["height"]),
                "width": int(image["width"]),
                "segments": segments,
            }
        )
    if unknown_categories:
        raise DataError(
            f"{dataset}: {source} uses category ids {sorted(unknown_categories)[:5]} that are not in its "
            f"'categories' list"
        )
    check_matches(dataset, unknown_images, "annotated image ids", f"the 'images' list of {source}")
    annotated = {ann["image_id"] for ann in annotations["annotations"]}
    unannotated = [img["file_name"] for img in annotations["images"] if img["id"] not in annotated]
    check_matches(dataset, unannotated, "annotations of listed images", source)
    image_names, mask_names = set(images.names()), set(masks.names())
    check_matches(
        dataset, [r["image"] for r in records if r["image"] not in image_names], "images", str(images)
    )
    check_matches(dataset, [r["mask"] for r in records if r["mask"] not in mask_names], "PNGs", str(masks))
    return records


class PanopticJsonDataset(JsonCategoriesDataset):
    """Panoptic samples from a COCO-panoptic-format JSON plus its PNGs: subclasses implement `read_json()`.

    `class_names`: the configured names, which must be the JSON's categories (things first).
    `skip_empty`: leave out images without any segment in the JSON (`eomt.data.empty`).
    """

    images: Store
    masks: Store

    def read_json(self) -> PanopticJson:
        raise NotImplementedError

    def index(self) -> list[dict]:
        found = self.read_json()
        self.images, self.masks = found.images, found.masks
        self.category_ids, self.class_names, self.thing_classes = things_first(
            found.annotations["categories"]
        )
        self.check_class_names(found.source)
        return index_panoptic_json(self.name, found, self.category_ids)

    def empty(self, records: list[dict]) -> list[bool]:
        return [not r["segments"] for r in records]

    def load(self, record: dict) -> dict:
        image = read_image(self.images, record["image"])
        id_map = rgb_to_id(read_png(self.masks, record["mask"])[..., :3])
        size = (record["height"], record["width"])
        if tuple(image.shape[1:]) != size or id_map.shape != size:
            raise DataError(
                f"{self.name}: sizes disagree for {record['file_name']}: JSON {size}, image "
                f"{tuple(image.shape[1:])}, PNG {id_map.shape}"
            )
        return {
            "image": image,
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "orig_size": size,
            **self.targets(id_map, record["segments"]),
        }

    def targets(self, id_map: Any, segments: list[dict]) -> dict:
        return panoptic_fields(id_map, segments)


class SemanticFromPanoptic:
    """Mixin: semantic samples (one mask per class, 255 = void) derived from the panoptic PNGs.

    Crowd regions keep their class, as in COCO's panoptic-to-semantic conversion.
    """

    def targets(self, id_map: Any, segments: list[dict]) -> dict:
        lookup = {s["id"]: s["category_id"] for s in segments}
        ids = np.array([0, *lookup], dtype=np.int64)
        classes = np.array([255, *lookup.values()], dtype=np.int64)
        order = np.argsort(ids)
        position = np.searchsorted(ids[order], id_map)
        position = np.clip(position, 0, len(ids) - 1)
        known = ids[order][position] == id_map
        semantic = np.where(known, classes[order][position], 255)
        return semantic_fields(semantic)
