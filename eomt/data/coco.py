"""COCO (REFERENCE §4), read from the four published zips in `root`.

    train2017.zip, val2017.zip                 train2017/*.jpg, val2017/*.jpg
    annotations_trainval2017.zip               annotations/instances_{train,val}2017.json
    panoptic_annotations_trainval2017.zip      annotations/panoptic_{train,val}2017.json and the
                                               nested annotations/panoptic_{train,val}2017.zip
                                               holding panoptic_{train,val}2017/*.png

Class ids come from the JSON's categories (things first), so smaller COCO-layout datasets (the
synthetic one) read the same way.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import torch
from pycocotools import mask as mask_utils

from eomt.data.base import Archive, check_matches
from eomt.data.decode import read_image
from eomt.data.panoptic_json import (
    JsonCategoriesDataset,
    PanopticJson,
    PanopticJsonDataset,
    SemanticFromPanoptic,
)
from eomt.data.targets import empty_masks, instance_fields
from eomt.data.zipreader import ZipReader

SPLITS = {"train": "train2017", "val": "val2017"}
IMAGES = Archive("{split}.zip", "COCO images", "http://images.cocodataset.org/zips/{split}.zip")
INSTANCES_ZIP = "annotations_trainval2017.zip"
INSTANCES_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
PANOPTIC_ZIP = "panoptic_annotations_trainval2017.zip"
PANOPTIC_URL = "http://images.cocodataset.org/annotations/panoptic_annotations_trainval2017.zip"


def _read_json(store: ZipReader, member: str) -> dict:
    if member not in store.zipfile.NameToInfo:
        raise FileNotFoundError(f"COCO: {member} not found inside {store.path}")
    return json.loads(store.read(member))


class CocoPanoptic(PanopticJsonDataset):
    """COCO panoptic: 133 classes (80 things, 53 stuff), crowd segments flagged."""

    name = "COCO panoptic"
    splits = SPLITS
    zips = {
        "annotations_zip": Archive(PANOPTIC_ZIP, "COCO panoptic annotations", PANOPTIC_URL),
        "images": IMAGES,
    }
    annotations_zip: ZipReader

    def read_json(self) -> PanopticJson:
        json_name = f"annotations/panoptic_{self.split}.json"
        return PanopticJson(
            annotations=_read_json(self.annotations_zip, json_name),
            source=json_name,
            images=self.images,
            image_prefix=f"{self.split}/",
            masks=ZipReader(self.annotations_zip.path, inner=f"annotations/panoptic_{self.split}.zip"),
            mask_prefix=f"panoptic_{self.split}/",
        )


class CocoSemantic(SemanticFromPanoptic, CocoPanoptic):
    """Semantic segmentation over COCO's panoptic classes, derived from the panoptic PNGs."""

    name = "COCO semantic (from panoptic)"


def _instance_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) as compressed RLE."""
    if isinstance(segmentation, list):
        if not segmentation:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}


class CocoInstance(JsonCategoriesDataset):
    """COCO instance segmentation: 80 thing classes from instances_{split}2017.json.

    `skip_empty`: leave out images without any annotation (crowd ones count; `eomt.data.empty`).
    """

    name = "COCO instance"
    splits = SPLITS
    zips = {"images": IMAGES, "annotations_zip": Archive(INSTANCES_ZIP, "COCO annotations", INSTANCES_URL)}
    images: ZipReader
    annotations_zip: ZipReader

    def index(self) -> list[dict]:
        json_name = f"annotations/instances_{self.split}.json"
        data = _read_json(self.annotations_zip, json_name)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = {int(c["id"]): i for i, c in enumerate(categories)}
        self.class_names = [c["name"] for c in categories]
        self.thing_classes = list(range(len(categories)))
        self.check_class_names(json_name)
        return self._index(data, json_name, f"{self.split}/")

    def empty(self, records: list[dict]) -> list[bool]:
        return [not r["annotations"] for r in records]

    def _index(self, data: dict, source: str, prefix: str) -> list[dict]:
        by_image: dict[int, list[dict]] = defaultdict(list)
        unknown_categories = {a["category_id"] for a in data["annotations"]} - set(self.category_ids)
        if unknown_categories:
            raise ValueError(
                f"{self.name}: {source} uses category ids {sorted(unknown_categories)[:5]} that are not in "
                f"its 'categories' list"
            )
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(
                {
                    "category_id": self.category_ids[ann["category_id"]],
                    "segmentation": ann["segmentation"],
                    "area": float(ann["area"]),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "bbox": [float(v) for v in ann["bbox"]],
                }
            )
        image_ids = {img["id"] for img in data["images"]}
        check_matches(
            self.name,
            sorted(str(i) for i in set(by_image) - image_ids),
            "annotated image ids",
            f"the 'images' list of {source}",
        )
        names = set(self.images.names())
        check_matches(
            self.name,
            [prefix + img["file_name"] for img in data["images"] if prefix + img["file_name"] not in names],
            "images",
            str(self.images),
        )
        return [
            {
                "image": prefix + img["file_name"],
                "image_id": img["id"],
                "file_name": img["file_name"],
                "height": int(img["height"]),
                "width": int(img["width"]),
                "annotations": by_image[img["id"]],
            }
            for img in data["images"]
        ]

    def load(self, record: dict) -> dict:
        image = read_image(self.images, record["image"])
        height, width = record["height"], record["width"]
        if tuple(image.shape[1:]) != (height, width):
            raise ValueError(
                f"{self.name}: {record['file_name']} is {tuple(image.shape[1:])} but the JSON says "
                f"{(height, width)}"
            )
        instances, masks = [], []
        for ann in record["annotations"]:
            rle = _instance_rle(ann["segmentation"], height, width)
            masks.append(torch.from_numpy(mask_utils.decode(rle).astype(bool)))
            instances.append(
                {**ann, "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}}
            )
        mask_tensor = torch.stack(masks) if masks else empty_masks(height, width)
        return {
            "image": image,
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "orig_size": (height, width),
            **instance_fields(instances, mask_tensor),
        }
