"""Semantic segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

mIoU averages over the classes present in the ground truth or the prediction: a class predicted
but absent from the ground truth has IoU 0 and counts; a class absent from both is left out.
Pixels labelled `ignore_index` (255) are left out entirely, predictions on them included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eomt.distributed import sum_across_ranks


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in size"
        )
    target = target.to(prediction.device, torch.int64).reshape(-1)
    prediction = prediction.to(torch.int64).reshape(-1)
    valid = target != ignore_index
    target, prediction = target[valid], prediction[valid]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target labels must be 0..{num_classes - 1} or {ignore_index} (ignore)")
    if prediction.numel() and (prediction.min() < 0 or prediction.max() >= num_classes):
        raise ValueError(f"predicted labels must be 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def semantic_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """{"miou", "pixel_accuracy", "mean_accuracy", "per_class": {class: iou or nan}} as fractions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    gt_pixels, pred_pixels = confusion.sum(1), confusion.sum(0)
    union = gt_pixels + pred_pixels - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=present)
    in_gt = gt_pixels > 0
    accuracy = np.divide(tp, gt_pixels, out=np.full_like(tp, np.nan), where=in_gt)
    total = confusion.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "mean_accuracy": float(accuracy[in_gt].mean()) if in_gt.any() else 0.0,
        "num_classes_counted": int(present.sum()),
        "per_class": {c: float(v) for c, v in enumerate(iou)},
    }


class SemanticEvaluator:
    """Accumulates a confusion matrix over images; `compute()` sums it over DDP ranks.

    Predictions: `{"semantic": int (H,W) tensor}` per image; samples carry `semantic` int64 (H,W)
    with `ignore_index` for unlabelled pixels. Confusion sums cannot tell a repeated image apart,
    so evaluate with a sampler that does not pad (`eomt.evaluation.ShardSampler`).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self._confusion: torch.Tensor | None = None
        self._num_images = 0

    def update(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None:
        for prediction, sample in zip(predictions, samples, strict=True):
            pred = prediction["semantic"]
            confusion = confusion_matrix(
                pred, torch.as_tensor(sample["semantic"]), self.num_classes, self.ignore_index
            )
            self._confusion = confusion if self._confusion is None else self._confusion + confusion
            self._num_images += 1

    def compute(self) -> dict[str, Any]:
        local = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        if self._confusion is not None:
            local = self._confusion.cpu().numpy()
        result = semantic_metrics(sum_across_ranks(local))
        result["num_images"] = int(sum_across_ranks(np.array([self._num_images], dtype=np.int64))[0])
        return result
