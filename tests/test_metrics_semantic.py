"""mIoU edge cases: ignore label, classes absent from ground truth or from both, accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eomt.metrics.semantic import SemanticEvaluator, confusion_matrix, semantic_metrics

IGNORE = 255


def metrics_of(pred, target, num_classes=4):
    return semantic_metrics(
        confusion_matrix(torch.tensor(pred), torch.tensor(target), num_classes, IGNORE).numpy()
    )


def test_perfect_prediction():
    r = metrics_of([[0, 1], [2, 2]], [[0, 1], [2, 2]])
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0 and r["num_classes_counted"] == 3
    assert np.isnan(r["per_class"][3])  # absent from both: not counted


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    r = metrics_of([[0, 0], [1, 3]], [[0, 0], [1, 1]])
    # class 0: 1; class 1: 1/2; class 3: 0 (predicted, not in ground truth)
    assert r["per_class"][3] == 0.0 and r["num_classes_counted"] == 3
    assert r["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["pixel_accuracy"] == pytest.approx(3 / 4)
    assert r["mean_accuracy"] == pytest.approx((1 + 0.5) / 2)  # over classes in the ground truth


def test_ignored_pixels_are_left_out_with_their_predictions():
    r = metrics_of([[0, 3], [3, 3]], [[0, IGNORE], [IGNORE, IGNORE]])
    assert r["miou"] == 1.0 and r["num_classes_counted"] == 1 and np.isnan(r["per_class"][3])


def test_everything_ignored_gives_zero_without_error():
    r = metrics_of([[0, 1]], [[IGNORE, IGNORE]])
    assert r["miou"] == 0.0 and r["num_classes_counted"] == 0


def test_evaluator_accumulates_images_like_one_big_image():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 5, (6, 7)) for _ in range(3)]
    targets = [np.where(rng.random((6, 7)) < 0.1, IGNORE, rng.integers(0, 5, (6, 7))) for _ in range(3)]
    evaluator = SemanticEvaluator(num_classes=5, ignore_index=IGNORE)
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        evaluator.update([{"semantic": torch.tensor(p)}], [{"image_id": i, "semantic": torch.tensor(t)}])
    whole = metrics_of(np.concatenate(preds), np.concatenate(targets), num_classes=5)
    got = evaluator.compute()
    assert got["miou"] == pytest.approx(whole["miou"]) and got["num_images"] == 3
    evaluator.reset()
    assert evaluator.compute()["num_images"] == 0


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.tensor([0]), torch.tensor([9]), 4, IGNORE)
    with pytest.raises(ValueError, match="predicted labels"):
        confusion_matrix(torch.tensor([9]), torch.tensor([0]), 4, IGNORE)
