"""Turn decoded annotations into sample fields: binary masks, labels, and the evaluation forms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

IGNORE = 255


def masks_from_id_map(id_map: np.ndarray, ids: Sequence[int]) -> torch.Tensor:
    """One bool mask (N, H, W) per id in `ids`, from an (H, W) map of ids."""
    id_map_t = torch.from_numpy(np.ascontiguousarray(id_map, dtype=np.int64))
    ids_t = torch.as_tensor(list(ids), dtype=torch.int64).reshape(-1, 1, 1)
    return id_map_t.unsqueeze(0) == ids_t


def semantic_fields(semantic: np.ndarray, ignore_index: int = IGNORE) -> dict:
    """Masks and labels (one per class present) plus the semantic map, from contiguous class ids."""
    semantic = semantic.astype(np.int64)
    classes = [int(c) for c in np.unique(semantic) if c != ignore_index]
    masks = masks_from_id_map(semantic, classes)
    return {
        "masks": masks,
        "labels": torch.tensor(classes, dtype=torch.int64),
        "is_crowd": torch.zeros(len(classes), dtype=torch.bool),
        "semantic": torch.from_numpy(semantic),
    }


def panoptic_fields(id_map: np.ndarray, segments: Sequence[dict]) -> dict:
    """Masks, labels and crowd flags per segment, plus the panoptic ground truth.

    `segments`: dicts with `id`, contiguous `category_id`, `iscrowd` and `area`. Pixels whose id
    belongs to no segment become void (0) in the returned id map.
    """
    ids = [s["id"] for s in segments]
    id_map = np.where(np.isin(id_map, ids), id_map, 0).astype(np.int32)
    return {
        "masks": masks_from_id_map(id_map, ids),
        "labels": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
        "is_crowd": torch.tensor([bool(s["iscrowd"]) for s in segments], dtype=torch.bool),
        "panoptic": {
            "id_map": torch.from_numpy(id_map),
            "segments": [
                {
                    "id": int(s["id"]),
                    "category_id": int(s["category_id"]),
                    "iscrowd": int(s["iscrowd"]),
                    "area": int(s["area"]),
                }
                for s in segments
            ],
        },
    }


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an (H, W) binary mask, with `counts` as str."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def instance_annotation(category_id: int, mask: np.ndarray, iscrowd: bool) -> dict:
    """A COCO-style instance annotation computed from a binary mask."""
    rle = encode_rle(mask)
    return {
        "category_id": int(category_id),
        "segmentation": rle,
        "area": int(mask_utils.area(_bytes_rle(rle))),
        "iscrowd": int(iscrowd),
        "bbox": [float(v) for v in mask_utils.toBbox(_bytes_rle(rle))],
    }


def _bytes_rle(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def instance_fields(instances: Sequence[dict], masks: torch.Tensor) -> dict:
    """Masks, labels and crowd flags for instance annotations (already in evaluation form)."""
    return {
        "masks": masks,
        "labels": torch.tensor([a["category_id"] for a in instances], dtype=torch.int64),
        "is_crowd": torch.tensor([bool(a["iscrowd"]) for a in instances], dtype=torch.bool),
        "instances": list(instances),
    }


def empty_masks(height: int, width: int) -> torch.Tensor:
    return torch.zeros(0, height, width, dtype=torch.bool)
