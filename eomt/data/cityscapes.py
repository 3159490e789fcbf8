"""Cityscapes (REFERENCE §4), read from the published zips in `root`.

    leftImg8bit_trainvaltest.zip   leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    gtFine_trainvaltest.zip        gtFine/{train,val}/<city>/<name>_gtFine_{labelIds,instanceIds}.png

Semantic: labelIds -> the 19 train ids (255 for the rest). Panoptic and instance read instanceIds:
a value >= 1000 is `labelId * 1000 + instance`; a smaller value is a labelId, which for a class
that has instances marks a crowd region (as in cityscapesScripts' panoptic conversion).
"""

from __future__ import annotations

import numpy as np
import torch

from eomt.data.base import Archive, SegmentationDataset, check_matches
from eomt.data.decode import read_image, read_png
from eomt.data.empty import scan_pngs, single_valued
from eomt.data.targets import (
    empty_masks,
    instance_annotation,
    instance_fields,
    panoptic_fields,
    semantic_fields,
)
from eomt.data.zipreader import ZipReader

SPLITS = {"train": "train", "val": "val"}
IMAGES_ZIP = "leftImg8bit_trainvaltest.zip"
LABELS_ZIP = "gtFine_trainvaltest.zip"
URL = "https://www.cityscapes-dataset.com/downloads/ (registration required)"

# labelId -> trainId for the 19 evaluated classes (the Cityscapes label table); others are 255.
LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
THING_TRAIN_IDS = tuple(range(11, 19))  # person, rider, car, truck, bus, train, motorcycle, bicycle
# labelIds whose objects are annotated as instances (caravan 29 and trailer 30 are not evaluated).
HAS_INSTANCES = frozenset({24, 25, 26, 27, 28, 29, 30, 31, 32, 33})

_TRAIN_LOOKUP = np.full(256, 255, dtype=np.int64)
for _label, _train in LABEL_TO_TRAIN.items():
    _TRAIN_LOOKUP[_label] = _train


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds -> train ids 0..18, 255 for ignored labels."""
    return _TRAIN_LOOKUP[np.clip(label_ids.astype(np.int64), 0, 255)]


def instance_segments(instance_ids: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Segments (train-id classes) of an instanceIds map, and the map with ignored values set to 0."""
    segments, id_map = [], np.zeros(instance_ids.shape, dtype=np.int32)
    for value in np.unique(instance_ids):
        label = int(value) // 1000 if value >= 1000 else int(value)
        train = LABEL_TO_TRAIN.get(label)
        if train is None:
            continue
        mask = instance_ids == value
        segments.append(
            {
                "id": len(segments) + 1,
                "category_id": train,
                "area": int(mask.sum()),
                "iscrowd": int(value < 1000 and label in HAS_INSTANCES),
            }
        )
        id_map[mask] = segments[-1]["id"]
    return id_map, segments


class CityscapesSemantic(SegmentationDataset):
    """Cityscapes semantic segmentation: 19 classes.

    `skip_empty`: leave out images whose label PNG (labelIds here, instanceIds for panoptic and
    instance) holds a single value (`eomt.data.empty`).
    """

    name = "Cityscapes semantic"
    label_suffix = "labelIds"
    splits = SPLITS
    zips = {
        "images": Archive(IMAGES_ZIP, "Cityscapes images", URL),
        "labels": Archive(LABELS_ZIP, "Cityscapes annotations", URL),
    }
    images: ZipReader
    labels: ZipReader

    def empty(self, records: list[dict]) -> list[bool]:
        members = [[(self.labels, r["label"])] for r in records]
        return scan_pngs(f"cityscapes_{self.label_suffix}", members, lambda pngs: single_valued(pngs[0]))

    def index(self) -> list[dict]:
        image_dir, suffix = f"leftImg8bit/{self.split}/", "_leftImg8bit.png"
        images = sorted(n for n in self.images.names() if n.startswith(image_dir) and n.endswith(suffix))
        if not images:
            raise ValueError(f"{self.name}: no images under {image_dir} in {self.images}")
        records = []
        for name in images:
            city_and_stem = name[len(image_dir) : -len(suffix)]  # "<city>/<city>_<seq>_<frame>"
            records.append(
                {
                    "image": name,
                    "image_id": city_and_stem.split("/")[-1],
                    "file_name": name,
                    "label": f"gtFine/{self.split}/{city_and_stem}_gtFine_{self.label_suffix}.png",
                }
            )
        names = set(self.labels.names())
        check_matches(
            self.name,
            [r["label"] for r in records if r["label"] not in names],
            f"gtFine {self.label_suffix} PNGs",
            str(self.labels),
        )
        return records

    def load(self, record: dict) -> dict:
        image = read_image(self.images, record["image"])
        label = read_png(self.labels, record["label"])
        if tuple(image.shape[1:]) != label.shape[:2]:
            raise ValueError(
                f"{self.name}: {record['file_name']} is {tuple(image.shape[1:])} but {record['label']} is "
                f"{label.shape[:2]}"
            )
        return {
            "image": image,
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "orig_size": tuple(image.shape[1:]),
            **self.targets(label),
        }

    def targets(self, label: np.ndarray) -> dict:
        return semantic_fields(train_ids(label))


class CityscapesPanoptic(CityscapesSemantic):
    """Cityscapes panoptic from gtFine instanceIds: 19 classes (8 things), crowd regions flagged."""

    name = "Cityscapes panoptic"
    label_suffix = "instanceIds"

    def targets(self, label: np.ndarray) -> dict:
        return panoptic_fields(*instance_segments(label))


class CityscapesInstance(CityscapesSemantic):
    """Cityscapes instance segmentation from gtFine instanceIds: the 8 thing classes (ids 0..7)."""

    name = "Cityscapes instance"
    label_suffix = "instanceIds"

    def targets(self, label: np.ndarray) -> dict:
        id_map, segments = instance_segments(label)
        things = [s for s in segments if s["category_id"] in THING_TRAIN_IDS]
        masks = [id_map == s["id"] for s in things]
        instances = [
            instance_annotation(s["category_id"] - THING_TRAIN_IDS[0], m, bool(s["iscrowd"]))
            for s, m in zip(things, masks, strict=True)
        ]
        mask_tensor = torch.from_numpy(np.stack(masks)) if masks else empty_masks(*label.shape[:2])
        return instance_fields(instances, mask_tensor)
