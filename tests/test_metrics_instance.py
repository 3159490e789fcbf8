"""Mask AP: COCOeval on perfect, empty and ranked predictions; the Cityscapes AP convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from eomt.metrics.cityscapes_instance import cityscapes_ap, match_cityscapes_image
from eomt.metrics.instance import InstanceEvaluator, encode_masks

H, W = 40, 50


def box_mask(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def instance(mask, category, crowd=0):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "category_id": category,
        "segmentation": rle,
        "area": float(mask.sum()),
        "iscrowd": crowd,
        "bbox": [0, 0, 1, 1],
    }


def sample(image_id, instances):
    return {"image_id": image_id, "orig_size": (H, W), "instances": instances}


def prediction(masks, labels, scores):
    return {
        "masks": torch.tensor(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.bool),
        "labels": torch.tensor(labels, dtype=torch.long),
        "scores": torch.tensor(scores, dtype=torch.float),
    }


MASKS = [box_mask(0, 20, 0, 20), box_mask(20, 40, 25, 50), box_mask(2, 12, 30, 45)]  # areas 400, 500, 150
LABELS = [0, 1, 0]


def evaluate(preds, samples, **kwargs):
    evaluator = InstanceEvaluator(num_classes=3, cityscapes_ap=True, **kwargs)
    evaluator.update(preds, samples)
    return evaluator.compute()


def test_perfect_predictions_score_one():
    samples = [
        sample(1, [instance(m, c) for m, c in zip(MASKS, LABELS, strict=True)]),
        sample(2, [instance(MASKS[1], 1)]),
    ]
    preds = [prediction(MASKS, LABELS, [0.9, 0.8, 0.7]), prediction([MASKS[1]], [1], [0.6])]
    r = evaluate(preds, samples)
    assert (
        r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    )
    assert math.isnan(r["per_class"][2])  # no ground truth of class 2
    assert r["cityscapes"]["AP"] == pytest.approx(1.0) and r["cityscapes"]["AP50"] == pytest.approx(1.0)
    assert r["num_images"] == 2


def test_empty_prediction_scores_zero():
    samples = [sample(1, [instance(m, c) for m, c in zip(MASKS, LABELS, strict=True)])]
    r = evaluate([prediction([], [], [])], samples)
    assert r["AP"] == 0.0 and r["AP50"] == 0.0
    assert r["cityscapes"]["AP"] == 0.0


def test_a_higher_scored_false_positive_halves_coco_ap():
    samples = [sample(1, [instance(MASKS[0], 0)])]
    preds = [prediction([MASKS[2], MASKS[0]], [0, 0], [0.9, 0.8])]
    r = evaluate(preds, samples)
    assert r["AP"] == pytest.approx(0.5, abs=1e-6)
    # The Cityscapes step integration of the points (r=1, p=1/2), (r=0, p=0) gives 1/4.
    assert r["cityscapes"]["AP"] == pytest.approx(0.25)


def test_cityscapes_ignores_small_ground_truth_and_excuses_predictions_on_groups():
    tiny = box_mask(30, 35, 0, 5)  # 25 pixels < 100: need not be found
    group = box_mask(0, 20, 25, 45)
    samples = [sample(1, [instance(MASKS[0], 0), instance(tiny, 0), instance(group, 0, crowd=1)])]
    on_group = box_mask(0, 20, 25, 40)  # 300 pixels, all on the group: not a false positive
    preds = [prediction([MASKS[0], on_group], [0, 0], [0.5, 0.9])]
    matches = [match_cityscapes_image(preds[0], samples[0]["instances"])]
    assert matches[0].intersections.tolist() == [[400, 0, 0], [0, 0, 300]]
    assert cityscapes_ap(matches, num_classes=3)["AP"] == pytest.approx(1.0)
    # predicted as class 1, the group of class 0 does not excuse it; class 1 has no ground truth
    preds = [prediction([MASKS[0], on_group], [0, 1], [0.5, 0.9])]
    assert math.isnan(
        cityscapes_ap([match_cityscapes_image(preds[0], samples[0]["instances"])], 3)["per_class"][1]
    )


def test_void_excuses_a_cityscapes_false_positive():
    samples = [sample(1, [instance(MASKS[0], 0)])]
    preds = [prediction([MASKS[0], MASKS[1]], [0, 0], [0.5, 0.9])]
    void = torch.zeros(H, W, dtype=torch.bool)
    void[20:40, 25:50] = True
    assert cityscapes_ap([match_cityscapes_image(preds[0], samples[0]["instances"])], 1)["AP"] < 1.0
    assert cityscapes_ap([match_cityscapes_image(preds[0], samples[0]["instances"], void)], 1)["AP"] == 1.0


def test_wrong_mask_size_raises():
    with pytest.raises(ValueError, match="predicted masks"):
        InstanceEvaluator(num_classes=3).update(
            [
                {
                    "masks": torch.zeros(1, 5, 5, dtype=torch.bool),
                    "labels": torch.tensor([0]),
                    "scores": torch.tensor([1.0]),
                }
            ],
            [sample(1, [])],
        )


def test_encode_masks_gives_pycocotools_strings():
    rng = np.random.default_rng(0)
    height, width = 23, 17
    masks = np.zeros((9, height, width), dtype=bool)
    masks[0] = True  # everything: one run from the first to the last pixel
    masks[1, :, 4:6] = True  # full columns: runs that continue into the next column
    masks[2, -1, 3] = masks[2, 0, 4] = True  # a run across a column boundary
    masks[3, 0, 0] = masks[3, -1, -1] = True  # first and last pixel
    masks[4, 5:9, 2:11] = True  # a box
    masks[5] = rng.random((height, width)) < 0.3  # speckle
    masks[6, 2:20, 1:16] = rng.random((18, 15)) < 0.7
    # masks[7] stays empty; masks[8]: the last column
    masks[8, :, -1] = True
    expected = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert encode_masks(torch.from_numpy(masks)) == expected
    assert encode_masks(masks[:0]) == []
