"""Mask AP: COCOeval on perfect, empty and ranked predictions; the Cityscapes AP convention."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from eomt.errors import ConfigError
from eomt.metrics.cityscapes_instance import cityscapes_ap, match_cityscapes_image
from eomt.metrics.instance import InstanceEvaluator, ap_compute, coco_mask_ap, encode_masks

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
    # given boxes holding each mask's pixels, loose or tight, read only there: the same strings
    loose = [
        [0, height, 0, width],
        [0, height, 3, 7],
        [0, height, 3, 5],
        [0, height, 0, width],
        [4, 10, 1, 12],
    ]
    loose += [[0, height, 0, width], [1, 21, 0, 17], [3, 3, 0, 0], [0, height, width - 1, width]]
    assert encode_masks(masks, torch.tensor(loose)) == expected


def test_hotcoco_backend_gives_pycocotools_results(tmp_path):
    pytest.importorskip("hotcoco", reason="the optional extra eomt[metrics]; make test installs it")
    rng = np.random.default_rng(3)
    images, truth, detections = [], [], []
    for image_id in range(1, 9):
        height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        images.append({"id": image_id, "height": height, "width": width})
        for _ in range(int(rng.integers(1, 6))):
            mask = np.zeros((height, width), dtype=bool)
            y, x = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 12))
            mask[y : y + int(rng.integers(3, 30)), x : x + int(rng.integers(3, 30))] = True
            category = int(rng.integers(3))
            rle = encode_masks(mask[None])[0]
            truth.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "iscrowd": int(rng.random() < 0.1),
                }
            )
            for _ in range(2):
                moved = np.roll(mask, int(rng.integers(-4, 5)), axis=int(rng.integers(2)))
                detections.append(
                    {
                        "image_id": image_id,
                        "segmentation": encode_masks(moved[None])[0],
                        "category_id": category if rng.random() < 0.8 else int(rng.integers(3)),
                        "score": float(rng.random()),
                    }
                )
    reference = coco_mask_ap(images, truth, detections, num_classes=3)
    fast = coco_mask_ap(images, truth, detections, num_classes=3, backend="hotcoco")
    assert reference["AP"] > 0.1 and json.dumps(fast) == json.dumps(reference)

    def plain(rle):
        return {"size": rle["size"], "counts": rle["counts"].decode()}

    gt_file, results_file = tmp_path / "gt.json", tmp_path / "results.json"
    gt_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": [
                    {
                        **a,
                        "id": i + 1,
                        "category_id": a["category_id"] + 1,
                        "segmentation": plain(a["segmentation"]),
                    }
                    for i, a in enumerate(truth)
                ],
                "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(3)],
            }
        )
    )
    results_file.write_text(
        json.dumps(
            [
                {**d, "category_id": d["category_id"] + 1, "segmentation": plain(d["segmentation"])}
                for d in detections
            ]
        )
    )
    from_files = ap_compute(gt_file, results_file)
    assert json.dumps(ap_compute(gt_file, results_file, backend="hotcoco")) == json.dumps(from_files)
    assert json.dumps(from_files) == json.dumps({k: reference[k] for k in from_files})


def test_an_unknown_metric_backend_is_one_line():
    with pytest.raises(ConfigError, match="backend=fastcoco is not one of pycocotools|hotcoco"):
        InstanceEvaluator(num_classes=3, backend="fastcoco")


@pytest.mark.slow
def test_eval_benchmark_runs_and_finds_the_backends_identical():
    """bench/eval.py's instance part end to end (one tiny pass): its comparisons find equal results."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [
            sys.executable,
            "bench/eval.py",
            "--tasks",
            "instance",
            "--images",
            "1",
            "--repeats",
            "1",
            "--offline-images",
            "2",
            "--wait-ms",
            "1",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pycocotools" in run.stdout and "pipelined" in run.stdout
    assert "identical" in run.stdout and "DIFFERENT" not in run.stdout
