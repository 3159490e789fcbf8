"""Predictions in the standard file formats, written as evaluation goes.

Each writer is an evaluation callback (`writer(predictions, samples)`, see `eomt.evaluation`)
plus `close()`, which gathers what the ranks collected and writes the index file from rank 0.
Every file is written atomically (temporary file, then `os.replace`).

- `CocoPanopticWriter`: COCO panoptic PNGs (id = R + 256 G + 256^2 B) + `panoptic.json`, the
  format of the COCO test-dev server and of `eomt.metrics.panoptic.pq_compute`.
- `CocoInstanceWriter`: a COCO results JSON (RLE `segmentation`, `score`, no `bbox`).
- `SemanticPngWriter`: one label PNG per image, e.g. Cityscapes labelIds for its benchmark.

`category_ids` / `label_ids` map contiguous class ids to the dataset's own ids (COCO's 1..200,
Cityscapes' labelIds); None writes the contiguous ids.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eomt.atomic import write_bytes, write_json
from eomt.data.cityscapes import LABEL_TO_TRAIN
from eomt.distributed import gather_to_main, is_main
from eomt.metrics.instance import encode_masks
from eomt.metrics.panoptic import id_to_rgb


def write_png(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _map_ids(ids: Sequence[int] | None, index: int) -> int:
    return int(ids[index]) if ids is not None else int(index)


def label_png(labels: np.ndarray, label_ids: Sequence[int] | None = None) -> np.ndarray:
    """Class map (H,W) -> uint8 (uint16 when needed) map of dataset label ids."""
    labels = _numpy(labels).astype(np.int64)
    if label_ids is not None:
        labels = np.asarray(label_ids, dtype=np.int64)[labels]
    return labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)


def panoptic_record(
    prediction: dict, image_id: Any, file_name: str, category_ids: Sequence[int] | None = None
) -> dict:
    """A COCO panoptic annotation (`segments_info` with areas) for one predicted id map."""
    areas = np.bincount(_numpy(prediction["id_map"]).reshape(-1).astype(np.int64))
    return {
        "image_id": image_id,
        "file_name": file_name,
        "segments_info": [
            {
                "id": int(s["id"]),
                "category_id": _map_ids(category_ids, s["category_id"]),
                "iscrowd": 0,
                "isthing": int(bool(s.get("isthing", True))),
                "area": int(areas[s["id"]]),
                "score": float(s.get("score", 1.0)),
            }
            for s in prediction["segments"]
        ],
    }


def instance_records(
    prediction: dict, image_id: Any, category_ids: Sequence[int] | None = None
) -> list[dict]:
    """COCO results entries of one image (RLE counts as str; no `bbox`, so COCOeval uses mask areas)."""
    labels, scores = _numpy(prediction["labels"]).tolist(), _numpy(prediction["scores"]).tolist()
    return [
        {
            "image_id": image_id,
            "category_id": _map_ids(category_ids, label),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "score": float(score),
        }
        for rle, label, score in zip(
            encode_masks(prediction["masks"], prediction.get("boxes")), labels, scores, strict=True
        )
    ]


def _png_name(file_name: str) -> str:
    return Path(file_name).stem + ".png"


class CocoPanopticWriter:
    """`output_dir/panoptic/<image>.png` per image and `output_dir/panoptic.json` on close()."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        category_ids: Sequence[int] | None = None,
        categories: Sequence[dict] | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.categories = list(categories) if categories is not None else []
        self.records: list[dict] = []

    def __call__(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            name = _png_name(sample["file_name"])
            write_png(self.output_dir / "panoptic" / name, id_to_rgb(_numpy(prediction["id_map"])))
            self.records.append(panoptic_record(prediction, sample["image_id"], name, self.category_ids))

    def close(self) -> Path:
        parts = gather_to_main(self.records)
        path = self.output_dir / "panoptic.json"
        if is_main():
            unique = {r["image_id"]: r for part in parts for r in part}
            write_json(path, {"annotations": list(unique.values()), "categories": self.categories})
        return path


class CocoInstanceWriter:
    """A COCO results JSON list at `path`, written on close()."""

    def __init__(self, path: str | os.PathLike, category_ids: Sequence[int] | None = None):
        self.path = Path(path)
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.records: dict[Any, list[dict]] = {}

    def __call__(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            self.records[sample["image_id"]] = instance_records(
                prediction, sample["image_id"], self.category_ids
            )

    def close(self) -> Path:
        parts = gather_to_main(self.records)
        if is_main():
            merged: dict[Any, list[dict]] = {}
            for part in parts:
                merged.update(part)
            write_json(self.path, [r for records in merged.values() for r in records])
        return self.path


class SemanticPngWriter:
    """`output_dir/<image>.png` holding `label_ids[class]` per pixel (e.g. Cityscapes labelIds)."""

    def __init__(self, output_dir: str | os.PathLike, label_ids: Sequence[int] | None = None):
        self.output_dir = Path(output_dir)
        self.label_ids = list(label_ids) if label_ids is not None else None

    def __call__(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            write_png(
                self.output_dir / _png_name(sample["file_name"]),
                label_png(prediction["semantic"], self.label_ids),
            )

    def close(self) -> Path:
        return self.output_dir


def cityscapes_label_ids() -> list[int]:
    """labelId of each of the 19 Cityscapes train ids (what the benchmark server reads)."""
    by_train = {train: label for label, train in LABEL_TO_TRAIN.items()}
    return [by_train[t] for t in sorted(by_train)]


def _contiguous_to_dataset_ids(dataset) -> list[int] | None:
    """The dataset's own category ids in contiguous order (COCO-format datasets), else None."""
    mapping = getattr(dataset, "category_ids", None)
    if not mapping:
        return None
    return [original for original, _ in sorted(mapping.items(), key=lambda item: item[1])]


# Label ids that a dataset's benchmark server reads from semantic PNGs (default: contiguous ids).
SEMANTIC_LABEL_IDS = {
    "cityscapes": cityscapes_label_ids,
    "ade20k": lambda: list(range(1, 151)),  # ADE20K's 1..150 (0 = other)
}


def prediction_writer(task: str, dataset_name: str, dataset, output_dir: Path):
    """The writer of `task`'s standard prediction format for `dataset` under `output_dir`."""
    category_ids = _contiguous_to_dataset_ids(dataset)
    writers = {
        "panoptic": lambda: CocoPanopticWriter(output_dir, category_ids=category_ids),
        "instance": lambda: CocoInstanceWriter(output_dir / "instances.json", category_ids=category_ids),
        "semantic": lambda: SemanticPngWriter(
            output_dir / "semantic", label_ids=SEMANTIC_LABEL_IDS.get(dataset_name, lambda: None)()
        ),
    }
    if task not in writers:
        raise ValueError(f"task={task} has no prediction format; use one of {'|'.join(writers)}")
    return writers[task]()
