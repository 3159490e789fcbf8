"""Panoptic quality (PQ, SQ, RQ) with exactly the semantics of panopticapi's `pq_compute`.

The rules, per image (panopticapi, Kirillov et al. 2019):
- ground-truth segment areas come from the annotation's `area` field, predicted areas from the map;
- IoU = intersection / (union - the prediction's pixels on ground-truth void); a (non-crowd)
  ground-truth segment and a prediction of the same category match when IoU > 0.5 (strictly);
- unmatched non-crowd ground truth is a false negative; crowd segments are never matched and
  never false negatives;
- an unmatched prediction is a false positive unless more than half of its pixels lie on void
  or on the crowd region of its category (panopticapi keeps one crowd segment per category: the
  last one listed, which is the only one COCO ever has);
- PQ = sum IoU / (TP + FP/2 + FN/2) per category, averaged over the categories that have any
  TP, FP or FN.

`pq_image_stats` is the vectorised per-image kernel, shared by `pq_compute` (COCO panoptic JSON +
PNG folders, parallel over images) and `PanopticEvaluator` (in-memory predictions during
evaluation, summed across DDP ranks).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eomt.data.decode import png_ids
from eomt.distributed import all_gather_object
from eomt.errors import ConfigError

VOID = 0
IOU_THRESHOLD = 0.5
# Rows of the per-category statistics array.
TP, FP, FN, IOU = range(4)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_id`: segment ids (H,W) -> (H,W,3) uint8."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def _index_of(values: np.ndarray, ids: np.ndarray, absent: int) -> np.ndarray:
    """Position (intp) of each of `values` (a flat map of segment ids, non-negative) in `ids`
    (unique), `absent` where not listed.

    A lookup table: indexed by the value itself when the values are small (our predictions'
    1..K), else by a hash of it checked against the listed id (PNG ids have 24 bits). A few
    cheap passes over the pixels, where searchsorted or np.unique cost a search or a sort each.
    """
    ids = ids.astype(np.int64)
    if len(ids) == 0:
        return np.full(values.shape, absent, dtype=np.intp)
    top = int(values.max()) if values.size else 0
    if values.size and values.dtype.kind == "i" and values.min() < 0:
        raise ValueError(f"segment id {int(values.min())} in a panoptic map: ids are 0 (void) or positive")
    if max(top, int(ids.max())) < 1 << 16:
        table = np.full(max(top, int(ids.max())) + 1, absent, dtype=np.intp)
        table[ids] = np.arange(len(ids))
        return np.take(table, values)
    bits = max(4, int(np.ceil(np.log2(len(ids)))) + 2)
    for shift in (24, 12, 8, 16):  # 24: the low bits alone (PNG ids have 24 bits)
        for width in range(bits, 17):
            mask = (1 << width) - 1
            slots = (ids ^ (ids >> shift)) & mask
            if len(np.unique(slots)) < len(ids):
                continue
            position = np.full(1 << width, absent, dtype=np.intp)
            position[slots] = np.arange(len(ids))
            slot_id = np.full(1 << width, -1, dtype=np.intp)  # no segment id: never equal
            slot_id[slots] = ids
            values = values.astype(np.intp)
            hashed = values >> shift
            hashed ^= values
            hashed &= mask
            index = np.take(position, hashed)
            index[np.take(slot_id, hashed) != values] = absent
            return index
    order = np.argsort(ids)  # no collision-free hash of at most 16 bits: binary search
    pos = np.searchsorted(ids[order], values).clip(max=len(ids) - 1)
    return np.where(ids[order][pos] == values, order[pos], absent)


def _segment_arrays(segments: Sequence[dict], what: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([int(s["id"]) for s in segments], dtype=np.int64)
    cats = np.array([int(s["category_id"]) for s in segments], dtype=np.int64)
    if (ids == VOID).any():
        raise ValueError(
            f"{what} segment with id 0: id 0 means void in panoptic maps; number segments from 1"
        )
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{what} segments_info lists a segment id twice; ids must be unique per image")
    return ids, cats


def pq_image_stats(
    gt_map: np.ndarray,
    gt_segments: Sequence[dict],
    pred_map: np.ndarray,
    pred_segments: Sequence[dict],
    num_categories: int,
) -> np.ndarray:
    """Per-category (TP, FP, FN, sum of matched IoU) of one image, shape (4, num_categories).

    Maps hold segment ids (0 = void). Segments are `{"id", "category_id"}` dicts with
    `category_id` in 0..num_categories-1; ground-truth ones also carry `iscrowd` and `area`.
    """
    gt_map, pred_map = np.asarray(gt_map).reshape(-1), np.asarray(pred_map).reshape(-1)
    if gt_map.shape != pred_map.shape:
        raise ValueError(
            f"prediction map has {pred_map.size} pixels, ground truth {gt_map.size}: resize to the image"
        )
    gt_ids, gt_cats = _segment_arrays(gt_segments, "ground-truth")
    pred_ids, pred_cats = _segment_arrays(pred_segments, "predicted")
    for cats, what in ((gt_cats, "ground-truth"), (pred_cats, "predicted")):
        if len(cats) and (cats.min() < 0 or cats.max() >= num_categories):
            raise ValueError(
                f"{what} category_id outside 0..{num_categories - 1}: use contiguous category ids"
            )
    gt_crowd = np.array([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=bool)
    gt_area = np.array([s["area"] for s in gt_segments], dtype=np.float64)
    num_gt, num_pred = len(gt_ids), len(pred_ids)

    # Rows: ground-truth segments, then void, then ids the annotation does not list (they count
    # towards prediction areas only). Columns: predicted segments, then void. (Void, id 0, is
    # looked up as the last listed id.)
    gt_index = _index_of(gt_map, np.append(gt_ids, VOID), absent=num_gt + 1)
    pred_index = _index_of(pred_map, np.append(pred_ids, VOID), absent=-1)
    if (pred_index < 0).any():
        unknown = np.unique(pred_map[pred_index < 0])[:5].tolist()
        raise ValueError(f"segment ids {unknown} are in the prediction map but not in its segments_info")
    counts = np.bincount(gt_index * (num_pred + 1) + pred_index, minlength=(num_gt + 2) * (num_pred + 1))
    counts = counts.reshape(num_gt + 2, num_pred + 1)

    pred_area = counts.sum(0)[:num_pred]
    if (pred_area == 0).any():
        missing = pred_ids[pred_area == 0][:5].tolist()
        raise ValueError(f"segments {missing} are in segments_info but have no pixels in the prediction map")
    inter = counts[:num_gt, :num_pred]
    pred_on_void = counts[num_gt, :num_pred]

    stats = np.zeros((4, num_categories), dtype=np.float64)
    candidate = (inter > 0) & ~gt_crowd[:, None] & (gt_cats[:, None] == pred_cats[None, :])
    union = pred_area[None, :] + gt_area[:, None] - inter - pred_on_void[None, :]
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=candidate)
    matched = candidate & (iou > IOU_THRESHOLD)
    gt_rows, pred_cols = np.nonzero(matched)
    np.add.at(stats[TP], gt_cats[gt_rows], 1)
    np.add.at(stats[IOU], gt_cats[gt_rows], iou[gt_rows, pred_cols])

    gt_matched, pred_matched = matched.any(1), matched.any(0)
    fn = ~gt_matched & ~gt_crowd
    np.add.at(stats[FN], gt_cats[fn], 1)

    crowd_of_category = np.full(num_categories, -1, dtype=np.int64)
    for g in np.flatnonzero(gt_crowd):  # in listed order: the last crowd segment of a category wins
        crowd_of_category[gt_cats[g]] = g
    unmatched = np.flatnonzero(~pred_matched)
    crowd = crowd_of_category[pred_cats[unmatched]]
    ignored_pixels = pred_on_void[unmatched] + np.where(crowd >= 0, inter[crowd.clip(min=0), unmatched], 0)
    is_fp = ignored_pixels / pred_area[unmatched] <= 0.5
    np.add.at(stats[FP], pred_cats[unmatched[is_fp]], 1)
    return stats


def summarize_pq(
    stats: np.ndarray, is_thing: Sequence[bool], category_keys: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Accumulated (4, C) statistics -> {"All"|"Things"|"Stuff": {pq, sq, rq, n}, "per_class": ...}.

    Fractions, not percent. A category without TP, FP or FN is left out of the means (and reads
    0 in `per_class`, as in panopticapi); a group with no such category reads 0 with n = 0.
    """
    tp, fp, fn, iou = stats
    keys = list(range(stats.shape[1])) if category_keys is None else list(category_keys)
    is_thing = np.asarray(is_thing, dtype=bool)
    counted = (tp + fp + fn) > 0
    denominator = np.where(counted, tp + 0.5 * fp + 0.5 * fn, 1.0)
    pq = np.where(counted, iou / denominator, 0.0)
    sq = np.divide(iou, tp, out=np.zeros_like(iou), where=tp > 0)
    rq = np.where(counted, tp / denominator, 0.0)
    result: dict[str, Any] = {}
    for name, group in (("All", np.ones_like(is_thing)), ("Things", is_thing), ("Stuff", ~is_thing)):
        selected = group & counted
        n = int(selected.sum())
        result[name] = {
            key: float(v[selected].mean()) if n else 0.0 for key, v in (("pq", pq), ("sq", sq), ("rq", rq))
        }
        result[name]["n"] = n
    result["per_class"] = {
        key: {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i])} for i, key in enumerate(keys)
    }
    return result


# ---------------------------------------------------------------------------------------------
# pq_compute: files in, numbers out (panopticapi.evaluation.pq_compute's arguments and results)


def _read_id_map(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return png_ids(img)


def _pq_stats_of_files(
    pairs: list[tuple[dict, dict]], gt_folder: str, pred_folder: str, category_index: dict[int, int]
) -> np.ndarray:
    stats = np.zeros((4, len(category_index)), dtype=np.float64)
    for gt_ann, pred_ann in pairs:
        try:
            gt_segments = [
                {**s, "category_id": category_index[s["category_id"]]} for s in gt_ann["segments_info"]
            ]
            pred_segments = [
                {**s, "category_id": category_index[s["category_id"]]} for s in pred_ann["segments_info"]
            ]
        except KeyError as e:
            raise ValueError(
                f"image {gt_ann['image_id']}: category_id {e} is not in the ground-truth categories"
            ) from e
        try:
            stats += pq_image_stats(
                _read_id_map(Path(gt_folder) / gt_ann["file_name"]),
                gt_segments,
                _read_id_map(Path(pred_folder) / pred_ann["file_name"]),
                pred_segments,
                len(category_index),
            )
        except ValueError as e:
            raise ValueError(f"image {gt_ann['image_id']}: {e}") from e
    return stats


def pq_compute(
    gt_json_file: str | os.PathLike,
    pred_json_file: str | os.PathLike,
    gt_folder: str | os.PathLike | None = None,
    pred_folder: str | os.PathLike | None = None,
    num_workers: int | None = None,
    backend: str = "numpy",
) -> dict[str, Any]:
    """PQ of COCO-format panoptic predictions, with panopticapi's arguments and result layout.

    Folders default to the JSON path without `.json`. Returns {"All", "Things", "Stuff"} each
    {"pq", "sq", "rq", "n"} and "per_class" {category_id: {"pq", "sq", "rq"}}, as fractions.
    `num_workers` processes read and score the images (default: all CPUs). `backend="hotcoco"`
    scores them in hotcoco instead (the optional extra `eomt[metrics]`; the same numbers to
    ~1e-16, several times faster per core than numpy's path here or panopticapi: bench/eval.py).
    """
    gt_json_file, pred_json_file = str(gt_json_file), str(pred_json_file)
    gt_folder = str(gt_folder) if gt_folder is not None else gt_json_file.replace(".json", "")
    pred_folder = str(pred_folder) if pred_folder is not None else pred_json_file.replace(".json", "")
    for folder, what in ((gt_folder, "ground-truth"), (pred_folder, "prediction")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{what} PNG folder {folder} does not exist; pass it as {what.split('-')[0]}_folder"
            )
    if backend == "hotcoco":
        return _hotcoco_pq_compute(gt_json_file, pred_json_file, gt_folder, pred_folder)
    if backend != "numpy":
        raise ConfigError(f"pq_compute backend={backend} is not one of numpy|hotcoco")
    with open(gt_json_file) as f:
        gt_json = json.load(f)
    with open(pred_json_file) as f:
        pred_json = json.load(f)

    categories = gt_json["categories"]
    category_index = {c["id"]: i for i, c in enumerate(categories)}
    predictions = {ann["image_id"]: ann for ann in pred_json["annotations"]}
    pairs = []
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] not in predictions:
            raise ValueError(f"no prediction for the image with id {gt_ann['image_id']} in {pred_json_file}")
        pairs.append((gt_ann, predictions[gt_ann["image_id"]]))

    workers = max(1, min(num_workers or os.cpu_count() or 1, len(pairs) // 8))
    if workers == 1:
        stats = _pq_stats_of_files(pairs, gt_folder, pred_folder, category_index)
    else:
        chunks = [pairs[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(_pq_stats_of_files, chunk, gt_folder, pred_folder, category_index)
                for chunk in chunks
            ]
            stats = sum(f.result() for f in futures)
    is_thing = [bool(c.get("isthing", 0)) for c in categories]
    return summarize_pq(stats, is_thing, [c["id"] for c in categories])


def _hotcoco_pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: str, pred_folder: str) -> dict:
    try:
        from hotcoco.panoptic import pq_compute as hotcoco_pq_compute
    except ImportError as e:
        raise ConfigError(
            "backend=hotcoco needs the optional extra: pip install 'eomt[metrics]' (or hotcoco), "
            "or use backend=numpy"
        ) from e
    with contextlib.redirect_stdout(io.StringIO()):  # it prints panopticapi's table
        result = hotcoco_pq_compute(gt_json_file, pred_json_file, gt_folder, pred_folder)
    groups = {
        name: {k: result[name][k] for k in ("pq", "sq", "rq", "n")} for name in ("All", "Things", "Stuff")
    }
    per_class = {int(c): {k: v[k] for k in ("pq", "sq", "rq")} for c, v in result["per_class"].items()}
    return groups | {"per_class": per_class}


# ---------------------------------------------------------------------------------------------
# Evaluation-time accumulator


class PanopticEvaluator:
    """PQ over in-memory predictions; `compute()` sums the per-image statistics of all ranks.

    Predictions: `{"id_map": int (H,W) tensor/array, "segments": [{"id", "category_id"}, ...]}` per
    image; samples carry `panoptic` = `{"id_map", "segments": [{"id", "category_id", "iscrowd",
    "area"}]}` (see docs/architecture.md). Images are keyed by `image_id`, so an image a padded
    distributed sampler evaluates twice counts once.
    """

    def __init__(
        self, num_classes: int, thing_classes: Sequence[int], class_names: Sequence[str] | None = None
    ):
        if any(not 0 <= c < num_classes for c in thing_classes):
            raise ValueError(f"thing_classes must be contiguous ids in 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.is_thing = np.isin(np.arange(num_classes), list(thing_classes))
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self._stats: dict[Any, np.ndarray] = {}

    def update(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            target = sample["panoptic"]
            self._stats[sample["image_id"]] = pq_image_stats(
                _to_numpy(target["id_map"]),
                target["segments"],
                _to_numpy(prediction["id_map"]),
                prediction["segments"],
                self.num_classes,
            )

    def compute(self) -> dict[str, Any]:
        merged: dict[Any, np.ndarray] = {}
        for part in all_gather_object(self._stats):
            merged.update(part)
        total = sum(merged.values(), np.zeros((4, self.num_classes)))
        result = summarize_pq(total, self.is_thing)
        result["num_images"] = len(merged)
        return result


def _to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
