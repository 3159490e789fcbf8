"""Evaluators give the same answer on 2 ranks (gloo, each with its share of the images) as on 1.

Kept apart from the other metric tests with light imports: each spawned rank imports this module.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils

from eomt.metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator

NUM_IMAGES = 7


def sample_and_prediction(index: int) -> tuple[dict, dict]:
    """An image's ground truth (panoptic, semantic, instances) and a noisy prediction of it."""
    rng = np.random.default_rng(index)
    h, w = 30 + index, 40
    ids = np.zeros((h, w), dtype=np.int32)
    ids[h // 2 :] = 1  # stuff, class 2
    cats = {1: 2}
    for k in range(3):
        y, x = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 16))
        ids[y : y + 12, x : x + int(rng.integers(10, 16))] = k + 2  # >= 100 pixels: Cityscapes counts them
        cats[k + 2] = k % 2
    ids[:, :2] = 0
    present = [i for i in cats if (ids == i).any()]
    segments = [
        {"id": i, "category_id": cats[i], "iscrowd": int(i == 4), "area": int((ids == i).sum())}
        for i in present
    ]
    semantic = np.full((h, w), 255, dtype=np.int64)
    for s in segments:
        semantic[ids == s["id"]] = s["category_id"]
    instances = [
        {
            "category_id": s["category_id"],
            "segmentation": mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8))),
            "area": s["area"],
            "iscrowd": s["iscrowd"],
        }
        for s in segments
        if s["category_id"] != 2
    ]
    sample = {
        "image_id": index,
        "orig_size": (h, w),
        "panoptic": {"id_map": torch.from_numpy(ids), "segments": segments},
        "semantic": torch.from_numpy(semantic),
        "instances": instances,
    }

    noisy = ids.copy()
    noisy[rng.random(ids.shape) < 0.2] = 0
    kept = [s for s in segments if (noisy == s["id"]).any()]
    predicted_semantic = np.where(semantic == 255, 2, semantic)
    predicted_semantic[rng.random(ids.shape) < 0.1] = 0
    prediction = {
        "id_map": torch.from_numpy(noisy),
        "segments": [{"id": s["id"], "category_id": s["category_id"]} for s in kept],
        "semantic": torch.from_numpy(predicted_semantic),
        "masks": torch.stack([torch.from_numpy(noisy == s["id"]) for s in kept]),
        "labels": torch.tensor([s["category_id"] for s in kept]),
        "scores": torch.from_numpy(rng.random(len(kept))).float(),
    }
    return sample, prediction


def scores_of(indices) -> dict:
    evaluators = {
        "panoptic": PanopticEvaluator(num_classes=3, thing_classes=[0, 1]),
        "semantic": SemanticEvaluator(num_classes=3),
        "instance": InstanceEvaluator(num_classes=3, cityscapes_ap=True),
    }
    for i in indices:
        sample, prediction = sample_and_prediction(i)
        for evaluator in evaluators.values():
            evaluator.update([prediction], [sample])
    return {name: evaluator.compute() for name, evaluator in evaluators.items()}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    result = scores_of(range(rank, NUM_IMAGES, world))
    torch.distributed.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_give_the_answer_of_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2)
    single = scores_of(range(NUM_IMAGES))
    assert 0 < single["panoptic"]["All"]["pq"] < 1 and 0 < single["instance"]["AP"] < 1
    assert 0 < single["instance"]["cityscapes"]["AP"] < 1
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["panoptic"]["num_images"] == result["semantic"]["num_images"] == NUM_IMAGES
        for group in ("All", "Things", "Stuff"):
            assert result["panoptic"][group] == pytest.approx(single["panoptic"][group])
        assert result["semantic"]["miou"] == pytest.approx(single["semantic"]["miou"])
        for key in ("AP", "AP50", "AP75"):
            assert result["instance"][key] == pytest.approx(single["instance"][key], nan_ok=True)
        assert result["instance"]["cityscapes"]["AP"] == pytest.approx(single["instance"]["cityscapes"]["AP"])
