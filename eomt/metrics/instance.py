"""Instance segmentation: COCO mask AP through pycocotools' COCOeval (`segm`).

`backend="hotcoco"` runs the same evaluation in hotcoco (the optional extra `eomt[metrics]`), a
Rust port of COCOeval with identical results (tests compare them), many times faster;
pycocotools stays the default and the reference. `ap_compute(gt_json, results_json)` scores a
COCO results file offline.

Predictions are RLE-encoded masks with a score and no `bbox` key: with a box present, COCOeval's
`loadRes` would take areas from the boxes. Ground-truth areas are the annotations' `area`, as in
the official COCO evaluation. Optionally the Cityscapes AP convention alongside
(`eomt.metrics.cityscapes_instance`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eomt.distributed import broadcast_object, gather_to_main, is_main
from eomt.errors import ConfigError
from eomt.metrics.cityscapes_instance import CityscapesImageMatches, cityscapes_ap, match_cityscapes_image

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BACKENDS = ("pycocotools", "hotcoco")


def coco_api(backend: str = "pycocotools") -> tuple[Any, Any]:
    """(COCO, COCOeval) classes of `backend`: pycocotools (the reference) or hotcoco (optional)."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "hotcoco":
        try:
            import hotcoco
        except ImportError as e:
            raise ConfigError(
                "backend=hotcoco needs the optional extra: pip install 'eomt[metrics]' (or hotcoco), "
                "or use backend=pycocotools"
            ) from e
        return hotcoco.COCO, hotcoco.COCOeval
    raise ConfigError(f"metric backend={backend} is not one of {'|'.join(BACKENDS)}")


def encode_masks(
    masks: torch.Tensor | np.ndarray, boxes: torch.Tensor | np.ndarray | None = None
) -> list[dict]:
    """Binary masks (K,H,W) -> COCO RLE dicts (`counts` as bytes), as `pycocotools.mask.encode`.

    The run boundaries are found only inside each mask's bounding box (instance masks cover a
    small part of the image), then pycocotools compresses them: the same strings as `encode` on
    the whole (H,W,K) Fortran array, without that copy and scan of every pixel of every mask.
    `boxes` (K,4) (top, bottom, left, right; ends exclusive), each holding every True pixel of its
    mask (the CPU instance predictor's), spare the two passes over all masks that find them.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().to("cpu", torch.bool).numpy()
    masks = np.asarray(masks).astype(bool, copy=False)
    num, height, width = masks.shape
    if num == 0:
        return []
    if boxes is None:
        rows, cols = masks.any(2), masks.any(1)  # numpy's: far faster than torch's on bool
        # each mask's box: first and last row / column holding a True pixel
        found = rows.any(1)
        top, bottom = rows.argmax(1), np.where(found, height - rows[:, ::-1].argmax(1), 0)
        left, right = cols.argmax(1), width - cols[:, ::-1].argmax(1)
    else:
        top, bottom, left, right = np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes).T
    top, bottom, left, right = (v.tolist() for v in (top, bottom, left, right))
    empty = np.array([height * width], dtype=np.uint32)
    rles = []
    for k in range(num):
        y0, y1, x0, x1 = top[k], bottom[k], left[k], right[k]
        if y1 <= y0 or x1 <= x0:
            rles.append({"size": [height, width], "counts": empty})
            continue
        # column-major like COCO: each column of the box between a False row above and below
        columns = np.zeros((x1 - x0, y1 - y0 + 2), dtype=bool)
        columns[:, 1:-1] = masks[k, y0:y1, x0:x1].T
        changes = np.flatnonzero(columns[:, 1:] != columns[:, :-1])
        column, row = np.divmod(changes, y1 - y0 + 1)
        edges = np.empty(len(changes) + 2, dtype=np.int64)  # 0, the run boundaries, the end
        edges[0], edges[-1] = 0, height * width
        edges[1:-1] = (x0 + column) * height + y0 + row
        if y0 == 0 and y1 == height:  # a run crossing from one column into the next is one run
            joined = 1 + np.flatnonzero(edges[2:-1] == edges[1:-2])
            edges = np.delete(edges, np.concatenate([joined, joined + 1]))
        counts = np.diff(edges)
        if edges[-2] == height * width:  # the mask reaches the last pixel: no final empty run
            counts = counts[:-1]
        rles.append({"size": [height, width], "counts": counts.astype(np.uint32)})
    return mask_utils.frPyObjects(rles, height, width)


def coco_mask_ap(
    images: Sequence[dict],
    ground_truth: Sequence[dict],
    detections: Sequence[dict],
    num_classes: int,
    backend: str = "pycocotools",
) -> dict[str, Any]:
    """COCOeval `segm` on in-memory data; category ids are contiguous 0..num_classes-1.

    images: `{"id", "height", "width"}`; ground_truth: `{"image_id", "category_id", "segmentation",
    "area", "iscrowd"}`; detections: `{"image_id", "category_id", "segmentation", "score"}`.
    Returns AP, AP50, AP75, APs, APm, APl (fractions; nan where COCO has no ground truth to
    score) and "per_class" AP.
    """
    nan_result = {key: float("nan") for key in COCO_STATS} | {
        "per_class": dict.fromkeys(range(num_classes), float("nan"))
    }
    if not ground_truth:
        return nan_result
    # COCOeval treats an id of 0 as "unmatched", so shift annotation and category ids by one.
    dataset = {
        "images": list(images),
        "annotations": [
            {**ann, "id": i + 1, "category_id": ann["category_id"] + 1} for i, ann in enumerate(ground_truth)
        ],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
    }
    detections = [
        {k: v for k, v in d.items() if k != "bbox"} | {"category_id": d["category_id"] + 1}
        for d in detections
    ]
    gt = coco_from_dict(dataset, backend)
    result = _cocoeval(gt, detections, backend)
    precision = result.pop("precision")[:, :, :, 0, -1]  # IoU x recall x class, area all, 100 dets
    per_class = {}
    for c in range(num_classes):
        valid = precision[:, :, c][precision[:, :, c] > -1]
        per_class[c] = float(valid.mean()) if valid.size else float("nan")
    return result | {"per_class": per_class}


def coco_from_dict(dataset: dict, backend: str = "pycocotools") -> Any:
    """`backend`'s COCO index over an in-memory dataset (pycocotools takes only a file name in its constructor)."""
    coco, _ = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if backend != "pycocotools":
            return coco(dataset)
        index = coco()
        index.dataset = dataset
        index.createIndex()
    return index


def ap_compute(
    gt_json_file: str | os.PathLike, results_json_file: str | os.PathLike, backend: str = "pycocotools"
) -> dict[str, Any]:
    """Mask AP of a COCO results file (RLE `segmentation`, `score`) against a COCO annotation file.

    Returns AP, AP50, AP75, APs, APm, APl as fractions (nan where COCO has nothing to score);
    category ids are the files' own. Detections' `bbox` is dropped, as in `coco_mask_ap`.
    """
    coco, _ = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco(str(gt_json_file))
    with open(results_json_file) as f:
        detections = [{k: v for k, v in d.items() if k != "bbox"} for d in json.load(f)]
    result = _cocoeval(gt, detections, backend)
    result.pop("precision")
    return result


def _cocoeval(gt: Any, detections: list[dict], backend: str) -> dict[str, Any]:
    coco, cocoeval = coco_api(backend)
    with contextlib.redirect_stdout(io.StringIO()):  # both print progress and the summary
        if detections:
            dt = gt.loadRes(detections)
        else:  # loadRes cannot take an empty list; COCOeval scores no detections as AP 0
            empty = {
                "images": gt.dataset["images"],
                "annotations": [],
                "categories": gt.dataset["categories"],
            }
            dt = coco_from_dict(empty, backend)
        evaluator = cocoeval(gt, dt, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) if s >= 0 else float("nan") for s in evaluator.stats[:6]]
    return dict(zip(COCO_STATS, stats, strict=True)) | {"precision": np.asarray(evaluator.eval["precision"])}


class InstanceEvaluator:
    """Mask AP; `compute()` gathers every rank's images on rank 0, scores them, shares the result.

    Predictions: `{"masks": bool (K,H,W), "labels": int (K,), "scores": float (K,)}` per image;
    samples carry `instances` (COCO-style dicts, RLE `segmentation`, contiguous `category_id`).
    With `cityscapes_ap=True` the result also holds "cityscapes": {"AP", "AP50", "per_class"}.
    `backend`: "pycocotools" (the reference) or "hotcoco" (identical results, faster; optional).
    Images are keyed by `image_id`, so an image evaluated twice counts once.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        cityscapes_ap: bool = False,
        min_region_size: int = 100,
        ignore_index: int = 255,
        backend: str = "pycocotools",
    ):
        coco_api(backend)  # a missing optional backend is reported now, not after the evaluation
        self.backend = backend
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.cityscapes_ap = cityscapes_ap
        self.min_region_size = min_region_size
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self._images: dict[Any, dict] = {}

    def update(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            height, width = (int(s) for s in sample["orig_size"])
            if tuple(prediction["masks"].shape[-2:]) != (height, width):
                raise ValueError(
                    f"predicted masks are {tuple(prediction['masks'].shape[-2:])}, image {height}x{width}"
                )
            labels = prediction["labels"].tolist()
            scores = prediction["scores"].tolist()
            record: dict[str, Any] = {
                "height": height,
                "width": width,
                "ground_truth": [
                    {k: ann[k] for k in ("category_id", "segmentation", "area", "iscrowd")}
                    for ann in sample["instances"]
                ],
                "detections": [
                    {"category_id": int(label), "segmentation": rle, "score": float(score)}
                    for rle, label, score in zip(
                        encode_masks(prediction["masks"], prediction.get("boxes")),
                        labels,
                        scores,
                        strict=True,
                    )
                ],
            }
            if self.cityscapes_ap:
                void = None
                if sample.get("semantic") is not None:
                    void = torch.as_tensor(sample["semantic"]) == self.ignore_index
                record["cityscapes"] = match_cityscapes_image(prediction, sample["instances"], void)
            self._images[sample["image_id"]] = record

    def compute(self) -> dict[str, Any]:
        parts = gather_to_main(self._images)
        result = None
        if is_main():
            merged: dict[Any, dict] = {}
            for part in parts:
                merged.update(part)
            result = self._score(list(merged.values()))
        return broadcast_object(result)

    def _score(self, records: list[dict]) -> dict[str, Any]:
        images, ground_truth, detections = [], [], []
        for image_id, record in enumerate(records, start=1):
            images.append({"id": image_id, "height": record["height"], "width": record["width"]})
            ground_truth += [{**ann, "image_id": image_id} for ann in record["ground_truth"]]
            detections += [{**det, "image_id": image_id} for det in record["detections"]]
        result = coco_mask_ap(images, ground_truth, detections, self.num_classes, self.backend)
        result["num_images"] = len(records)
        if self.cityscapes_ap:
            matches: list[CityscapesImageMatches] = [r["cityscapes"] for r in records]
            result["cityscapes"] = cityscapes_ap(matches, self.num_classes, self.min_region_size)
        return result
