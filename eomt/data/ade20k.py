"""ADE20K (REFERENCE §4), read from the published zips in `root`.

    ADEChallengeData2016.zip   ADEChallengeData2016/images/{training,validation}/*.jpg
                               ADEChallengeData2016/annotations/{training,validation}/*.png
                               (value 0 = "other" -> ignore, 1..150 -> classes 0..149)
    annotations_instance.zip   annotations_instance/{training,validation}/*.png
                               (R = one of the 100 instance classes, G = instance id)

Panoptic samples take stuff from the semantic PNG and things from the instance PNG (pasted over
stuff), as in Mask2Former's conversion; thing pixels without an instance are void.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from eomt.data.base import Archive, SegmentationDataset, check_matches
from eomt.data.decode import read_image, read_png
from eomt.data.empty import scan_pngs, single_valued
from eomt.data.targets import panoptic_fields, semantic_fields
from eomt.data.zipreader import ZipReader

SPLITS = {"train": "training", "val": "validation"}
IMAGES_ZIP = "ADEChallengeData2016.zip"
IMAGES_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
INSTANCES_ZIP = "annotations_instance.zip"
INSTANCES_URL = (
    "http://sceneparsing.csail.mit.edu/data/ChallengeData2017/annotations_instance.tar, "
    "then: tar -xf annotations_instance.tar && zip -r -0 annotations_instance.zip annotations_instance/"
)
NUM_CLASSES = 150

# Instance class k (1..100, the R channel) is semantic class INSTANCE_TO_SEMANTIC[k - 1] (1..150):
# the challenge's instance/scene-parsing category mapping.
INSTANCE_TO_SEMANTIC = (
    8,
    9,
    11,
    13,
    15,
    16,
    19,
    20,
    21,
    23,
    24,
    25,
    28,
    31,
    32,
    33,
    34,
    36,
    37,
    38,
    39,
    40,
    42,
    43,
    44,
    45,
    46,
    48,
    50,
    51,
    54,
    56,
    57,
    58,
    59,
    63,
    65,
    66,
    67,
    68,
    70,
    71,
    72,
    73,
    74,
    75,
    76,
    77,
    79,
    81,
    82,
    83,
    84,
    86,
    87,
    88,
    89,
    90,
    91,
    93,
    94,
    96,
    98,
    99,
    103,
    104,
    105,
    108,
    109,
    111,
    112,
    113,
    116,
    117,
    119,
    120,
    121,
    122,
    124,
    125,
    126,
    127,
    128,
    130,
    131,
    133,
    134,
    135,
    136,
    137,
    138,
    139,
    140,
    143,
    144,
    145,
    147,
    148,
    149,
    150,
)
THING_CLASSES = tuple(c - 1 for c in INSTANCE_TO_SEMANTIC)  # contiguous ids 0..149

# R value -> contiguous class id; 255 where R is not an instance class.
_INSTANCE_LOOKUP = np.full(256, 255, dtype=np.int64)
_INSTANCE_LOOKUP[1 : len(INSTANCE_TO_SEMANTIC) + 1] = THING_CLASSES
_IS_THING = np.zeros(256, dtype=bool)
_IS_THING[list(THING_CLASSES)] = True


def semantic_classes(png: np.ndarray) -> np.ndarray:
    """ADE20K label values (0 = other, 1..150) -> contiguous ids 0..149 with 255 = ignore."""
    return (png.astype(np.int64) - 1) % 256


class ADE20KSemantic(SegmentationDataset):
    """ADE20K scene parsing: 150 classes, "other" ignored.

    `skip_empty`: leave out images whose label PNG holds a single value (`eomt.data.empty`).
    """

    name = "ADE20K semantic"
    splits = SPLITS
    zips = {"store": Archive(IMAGES_ZIP, "ADE20K", IMAGES_URL)}
    store: ZipReader

    def empty(self, records: list[dict]) -> list[bool]:
        members = [[(self.store, r["label"])] for r in records]
        return scan_pngs("ade20k_semantic", members, lambda pngs: single_valued(pngs[0]))

    def index(self) -> list[dict]:
        names = set(self.store.names())
        image_dir = f"ADEChallengeData2016/images/{self.split}/"
        label_dir = f"ADEChallengeData2016/annotations/{self.split}/"
        stems = sorted(
            n[len(image_dir) : -4] for n in names if n.startswith(image_dir) and n.endswith(".jpg")
        )
        if not stems:
            raise ValueError(f"{self.name}: no images under {image_dir} in {self.store}")
        records = [
            {
                "image": f"{image_dir}{s}.jpg",
                "label": f"{label_dir}{s}.png",
                "image_id": s,
                "file_name": f"{s}.jpg",
            }
            for s in stems
        ]
        check_matches(
            self.name,
            [r["label"] for r in records if r["label"] not in names],
            "annotation PNGs",
            str(self.store),
        )
        return records

    def load(self, record: dict) -> dict:
        image = read_image(self.store, record["image"])
        semantic = semantic_classes(read_png(self.store, record["label"]))
        _check_size(self.name, record, image, semantic)
        return {**self._header(record, image), **self.targets(record, semantic)}

    def targets(self, record: dict, semantic: np.ndarray) -> dict:
        return semantic_fields(semantic)

    @staticmethod
    def _header(record: dict, image) -> dict:
        return {
            "image": image,
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "orig_size": tuple(image.shape[1:]),
        }


class ADE20KPanoptic(ADE20KSemantic):
    """ADE20K panoptic: 150 classes (100 things, 50 stuff); no crowd regions."""

    name = "ADE20K panoptic"
    zips = {**ADE20KSemantic.zips, "instances": Archive(INSTANCES_ZIP, "ADE20K instances", INSTANCES_URL)}
    instances: ZipReader

    def empty(self, records: list[dict]) -> list[bool]:
        members = [[(self.store, r["label"]), (self.instances, r["instance"])] for r in records]
        return scan_pngs("ade20k_panoptic", members, lambda pngs: panoptic_pngs_empty(*pngs))

    def index(self) -> list[dict]:
        records = super().index()
        instance_dir = f"annotations_instance/{self.split}/"
        for r in records:
            r["instance"] = f"{instance_dir}{r['image_id']}.png"
        names = set(self.instances.names())
        check_matches(
            self.name,
            [r["instance"] for r in records if r["instance"] not in names],
            "instance PNGs",
            str(self.instances),
        )
        return records

    def targets(self, record: dict, semantic: np.ndarray) -> dict:
        instance_png = read_png(self.instances, record["instance"])
        if instance_png.ndim != 3 or instance_png.shape[:2] != semantic.shape:
            raise ValueError(
                f"{self.name}: {record['instance']} should be an RGB PNG of size {semantic.shape}, "
                f"got shape {instance_png.shape}"
            )
        id_map = np.zeros(semantic.shape, dtype=np.int32)
        segments = []
        for cls in np.unique(semantic):
            if cls == 255 or _IS_THING[cls]:
                continue
            segments.append({"id": len(segments) + 1, "category_id": int(cls), "iscrowd": 0})
            id_map[semantic == cls] = segments[-1]["id"]
        classes, instance_ids = instance_png[..., 0], instance_png[..., 1]
        for instance_id in np.unique(instance_ids):
            mask = instance_ids == instance_id
            cls = _INSTANCE_LOOKUP[np.bincount(classes[mask]).argmax()] if instance_id else 255
            if cls == 255:
                continue
            segments.append({"id": len(segments) + 1, "category_id": int(cls), "iscrowd": 0})
            id_map[mask] = segments[-1]["id"]
        # Every pixel left to a thing class without an instance is void (the stuff pass skipped it).
        areas = np.bincount(id_map.ravel(), minlength=len(segments) + 1)
        segments = [{**s, "area": int(areas[s["id"]])} for s in segments if areas[s["id"]] > 0]
        return panoptic_fields(id_map, segments)


def panoptic_pngs_empty(semantic_png: bytes, instance_png: bytes) -> bool:
    """The release's test for an empty ADE20K panoptic target, on the two PNGs' bytes: a single-valued
    semantic PNG, or a constant instance PNG without an instance and a semantic PNG without stuff."""
    if single_valued(semantic_png):
        return True
    if not single_valued(instance_png):
        return False
    instances = np.asarray(Image.open(io.BytesIO(instance_png)))
    if instances.ndim != 3 or instances[0, 0, 1] != 0:
        return False  # one instance covering the image (G = its id)
    values = np.unique(np.asarray(Image.open(io.BytesIO(semantic_png))))
    classes = values[(values >= 1) & (values <= NUM_CLASSES)].astype(np.int64) - 1
    return not (~_IS_THING[classes]).any()


def _check_size(dataset: str, record: dict, image, label: np.ndarray) -> None:
    if tuple(image.shape[1:]) != label.shape[:2]:
        raise ValueError(
            f"{dataset}: {record['file_name']} is {tuple(image.shape[1:])} but its annotation is "
            f"{label.shape[:2]}"
        )
