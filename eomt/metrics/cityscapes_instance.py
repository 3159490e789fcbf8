"""Instance AP by the Cityscapes convention (cityscapesScripts' evalInstanceLevelSemanticLabeling).

What is implemented, following that script with its default settings (no distance bins):
- IoU thresholds 0.5, 0.55, ..., 0.95; IoU = intersection / (gt + prediction - intersection),
  without void subtraction; a match needs IoU > threshold (strictly);
- ground truth smaller than 100 pixels and crowd ("group") regions are not to be found; a
  ground-truth instance matched by several predictions keeps the highest score as a true
  positive, and the others become false positives;
- an unmatched prediction that overlaps no same-class ground truth above the threshold is a false
  positive unless more than `threshold` of its pixels lie on void, on same-class groups or on
  same-class instances smaller than 100 pixels (the script counts a small group twice; so do we);
- AP per class and threshold from the precision/recall points at each distinct score, integrated
  stepwise as the script does (no interpolated envelope); a class with ground truth but no
  prediction scores 0, one with neither is left out; AP averages classes and thresholds, AP50
  is the 0.5 column.
Where our samples differ from the benchmark's files: groups are the `iscrowd` instances, and
void is the sample's `semantic == ignore` map when the sample has one (else there is no void).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

OVERLAPS = np.arange(0.5, 1.0, 0.05)


@dataclass
class CityscapesImageMatches:
    """What the AP computation needs of one image: sizes, classes and pairwise intersections."""

    gt_labels: np.ndarray  # (G,) int
    gt_areas: np.ndarray  # (G,) pixels
    gt_groups: np.ndarray  # (G,) bool, crowd / group regions
    pred_labels: np.ndarray  # (K,) int
    pred_scores: np.ndarray  # (K,) float
    pred_areas: np.ndarray  # (K,) pixels
    pred_void: np.ndarray  # (K,) pixels on void
    intersections: np.ndarray  # (K, G) pixels


def _pairwise_intersections(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """|a_k & b_g| for binary masks a (K,H,W), b (G,H,W), computed a band of rows at a time."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for top in range(0, a.shape[1], rows_per_chunk):
        a_rows = a[:, top : top + rows_per_chunk].flatten(1).float()
        b_rows = b[:, top : top + rows_per_chunk].flatten(1).float()
        out += (a_rows @ b_rows.T).double()  # exact: each band has far fewer than 2^24 pixels
    return out.round().long()


def match_cityscapes_image(
    prediction: dict, instances: Sequence[dict], void: torch.Tensor | None = None
) -> CityscapesImageMatches:
    """Pairwise statistics of one image's predicted masks and ground-truth instances.

    `prediction`: {"masks" bool (K,H,W), "labels", "scores"}; `instances`: COCO-style dicts with
    RLE `segmentation`, `category_id`, `iscrowd`; `void`: bool (H,W) or None.
    """
    masks = prediction["masks"].bool()
    device = masks.device
    if instances:
        gt = mask_utils.decode([ann["segmentation"] for ann in instances])  # (H,W,G) uint8
        gt_masks = torch.from_numpy(np.ascontiguousarray(gt.transpose(2, 0, 1))).to(device).bool()
    else:
        gt_masks = torch.zeros((0, *masks.shape[-2:]), dtype=torch.bool, device=device)
    pred_areas = masks.flatten(1).sum(1)
    keep = pred_areas > 0  # the script skips empty prediction masks
    masks = masks[keep]
    void_pixels = torch.zeros(masks.shape[0], dtype=torch.long, device=device)
    if void is not None:
        void_pixels = (masks & void.to(device).bool()[None]).flatten(1).sum(1)
    return CityscapesImageMatches(
        gt_labels=np.array([int(a["category_id"]) for a in instances], dtype=np.int64),
        gt_areas=gt_masks.flatten(1).sum(1).cpu().numpy(),
        gt_groups=np.array([bool(a.get("iscrowd", 0)) for a in instances], dtype=bool),
        pred_labels=prediction["labels"][keep.to(prediction["labels"].device)].cpu().numpy().astype(np.int64),
        pred_scores=prediction["scores"][keep.to(prediction["scores"].device)]
        .float()
        .cpu()
        .numpy()
        .astype(np.float64),
        pred_areas=pred_areas[keep].cpu().numpy(),
        pred_void=void_pixels.cpu().numpy(),
        intersections=_pairwise_intersections(masks, gt_masks).cpu().numpy(),
    )


def _average_precision(y_true: np.ndarray, y_score: np.ndarray, hard_false_negatives: int) -> float:
    """The script's precision/recall points at each distinct score, integrated stepwise."""
    if y_score.size == 0:
        return 0.0
    order = np.argsort(y_score)
    true_sorted = y_true[order]
    cumsum = np.append(np.cumsum(true_sorted), 0)  # index -1 reads the appended 0
    _, first = np.unique(y_score[order], return_index=True)
    num_true = cumsum[-2]
    below = cumsum[first - 1]
    tp = num_true - below
    fp = len(y_score) - first - tp
    fn = below + hard_false_negatives
    precision = np.append(tp / np.maximum(tp + fp, 1), 0.0)
    recall = np.append(tp / np.maximum(tp + fn, 1), 0.0)
    precision[-1] = precision[-2]
    recall_padded = np.concatenate([[recall[0]], recall, [0.0]])
    step_widths = np.convolve(recall_padded, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, step_widths))


def _class_ap(
    matches: Sequence[CityscapesImageMatches], category: int, threshold: float, min_region_size: int
) -> float:
    true_parts, score_parts = [], []
    hard_false_negatives = 0
    have_gt = have_pred = False
    for m in matches:
        preds = np.flatnonzero(m.pred_labels == category)
        gts = np.flatnonzero(m.gt_labels == category)
        small = m.gt_areas[gts] < min_region_size
        findable = ~m.gt_groups[gts] & ~small
        have_gt |= bool(findable.any())
        have_pred |= preds.size > 0
        scores = m.pred_scores[preds]
        inter = m.intersections[np.ix_(preds, gts)].astype(np.float64)
        union = m.gt_areas[gts][None, :] + m.pred_areas[preds][:, None] - inter
        above = (inter > 0) & (inter / np.maximum(union, 1) > threshold)

        for column in np.flatnonzero(findable):
            matched = scores[above[:, column]]
            if matched.size == 0:
                hard_false_negatives += 1
                continue
            # the best-scoring match is the true positive, the rest are false positives
            true_parts.append(np.r_[1.0, np.zeros(matched.size - 1)])
            best = np.argmax(matched)
            score_parts.append(np.r_[matched[best], np.delete(matched, best)])

        unmatched = ~above.any(1)
        ignore_weight = m.gt_groups[gts].astype(np.int64) + small.astype(np.int64)
        ignored = m.pred_void[preds] + inter @ ignore_weight
        false_positive = unmatched & (ignored / m.pred_areas[preds] <= threshold)
        true_parts.append(np.zeros(int(false_positive.sum())))
        score_parts.append(scores[false_positive])

    if not have_gt:
        return float("nan")
    if not have_pred:
        return 0.0
    return _average_precision(np.concatenate(true_parts), np.concatenate(score_parts), hard_false_negatives)


def cityscapes_ap(
    matches: Sequence[CityscapesImageMatches], num_classes: int, min_region_size: int = 100
) -> dict[str, Any]:
    """{"AP", "AP50", "per_class": {class: AP}} over all images (fractions; nan without ground truth)."""
    ap = np.array(
        [[_class_ap(matches, c, float(t), min_region_size) for t in OVERLAPS] for c in range(num_classes)]
    ).reshape(num_classes, len(OVERLAPS))
    scored = ~np.isnan(ap)

    def nan_mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    return {
        "AP": nan_mean(ap, scored),
        "AP50": nan_mean(ap[:, 0], scored[:, 0]),
        "per_class": {c: nan_mean(ap[c], scored[c]) for c in range(num_classes)},
    }
