"""evaluate() end to end on a stand-in network: its PQ equals pq_compute on the files it wrote, its
AP equals COCOeval on the results JSON it wrote; per-block metrics, overlays, tables, writers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn

from eomt.evaluation import MetricPipeline, ShardSampler, evaluate
from eomt.inference import InstancePredictor, PanopticPredictor, SemanticPredictor
from eomt.inference.writers import (
    CocoInstanceWriter,
    CocoPanopticWriter,
    SemanticPngWriter,
    cityscapes_label_ids,
)
from eomt.metrics import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator, pq_compute
from eomt.metrics.instance import coco_mask_ap
from eomt.metrics.panoptic import id_to_rgb
from eomt.metrics.table import format_table, scalar_metrics
from eomt.visualize import TITLE_HEIGHT, OverlayCollector, upscale_factor

NAMES = ["red", "green", "blue"]  # classes 0, 1 things; 2 stuff
CATEGORY_IDS = [11, 22, 33]


class ColourNet(nn.Module):
    """Stand-in EoMT: query q covers where colour channel q is bright and predicts class q."""

    def __init__(self, num_blocks: int = 2, intermediate: bool = False):
        super().__init__()
        self.img_size = (32, 32)
        self.num_classes = 3
        self.num_blocks = num_blocks
        self.intermediate = intermediate
        self.gain = nn.Parameter(torch.tensor(30.0))

    def forward(self, images):
        feats = F.avg_pool2d(images, 4)
        masks = torch.cat([(feats - 0.5) * self.gain, torch.full_like(feats[:, :1], -20.0)], 1)
        classes = (torch.eye(4) * 8.0).expand(images.shape[0], -1, -1)
        points = self.num_blocks + 1 if self.intermediate else 1
        return [masks] * points, [classes] * points


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """Images with a blue stuff floor and red/green rectangles; panoptic, semantic and instance truth."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
        image = np.zeros((3, h, w), dtype=np.uint8)
        ids = np.zeros((h, w), dtype=np.int32)
        segments = []
        floor = h * 2 // 3
        image[2, floor:] = 255
        ids[floor:] = 1
        segments.append({"id": 1, "category_id": 2, "iscrowd": 0})
        for k, channel in enumerate((0, 1, 0)):
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w - 12))
            hh, ww = int(rng.integers(8, 16)), int(rng.integers(8, 14))
            image[:, y : y + hh, x : x + ww] = 0
            image[channel, y : y + hh, x : x + ww] = 255
            ids[y : y + hh, x : x + ww] = k + 2
            segments.append({"id": k + 2, "category_id": channel, "iscrowd": int(k == 2 and i % 2 == 0)})
        ids[:, :2] = 0  # a void strip
        segments = [{**s, "area": int((ids == s["id"]).sum())} for s in segments if (ids == s["id"]).any()]
        semantic = np.full((h, w), 255, dtype=np.int64)
        for s in segments:
            semantic[ids == s["id"]] = s["category_id"]
        instances = []
        for s in segments:
            if s["category_id"] == 2:
                continue
            rle = mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
            rle = {"size": rle["size"], "counts": rle["counts"].decode()}
            instances.append(
                {
                    "category_id": s["category_id"],
                    "segmentation": rle,
                    "area": s["area"],
                    "iscrowd": s["iscrowd"],
                }
            )
        samples.append(
            {
                "image": torch.from_numpy(image),
                "image_id": 100 + i,
                "file_name": f"img{i:03d}.jpg",
                "orig_size": (h, w),
                "panoptic": {"id_map": torch.from_numpy(ids), "segments": segments},
                "semantic": torch.from_numpy(semantic),
                "instances": instances,
            }
        )
    return samples


def batches(samples, size=3):
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def write_ground_truth(folder: Path, samples) -> Path:
    (folder / "gt").mkdir(parents=True)
    annotations = []
    for s in samples:
        name = Path(s["file_name"]).stem + ".png"
        Image.fromarray(id_to_rgb(s["panoptic"]["id_map"].numpy())).save(folder / "gt" / name)
        segs = [{**seg, "category_id": CATEGORY_IDS[seg["category_id"]]} for seg in s["panoptic"]["segments"]]
        annotations.append({"image_id": s["image_id"], "file_name": name, "segments_info": segs})
    categories = [
        {"id": c, "name": n, "isthing": int(i < 2)}
        for i, (c, n) in enumerate(zip(CATEGORY_IDS, NAMES, strict=True))
    ]
    path = folder / "gt.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return path


def test_evaluate_pq_equals_pq_compute_on_the_written_predictions(tmp_path):
    samples = make_samples(8)
    writer = CocoPanopticWriter(tmp_path / "pred", category_ids=CATEGORY_IDS)
    overlays = OverlayCollector("panoptic", NAMES, max_images=2)
    model = ColourNet()
    model.train()
    metrics = evaluate(
        model,
        batches(samples),
        PanopticPredictor(thing_classes=[0, 1]),
        PanopticEvaluator(num_classes=3, thing_classes=[0, 1]),
        callbacks=[writer, overlays],
        progress=False,
    )
    assert model.training  # given back in its mode
    writer.close()
    from_files = pq_compute(
        write_ground_truth(tmp_path, samples),
        tmp_path / "pred" / "panoptic.json",
        tmp_path / "gt",
        tmp_path / "pred" / "panoptic",
    )
    assert 0.5 < metrics["All"]["pq"] < 1.0 and metrics["num_images"] == 8
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert metrics[group][key] == pytest.approx(from_files[group][key], abs=1e-12)

    assert [image_id for image_id, _ in overlays.overlays] == [100, 101]
    overlay = overlays.overlays[0][1]
    h, w = samples[0]["orig_size"]
    f = upscale_factor(h, w)  # small images are drawn enlarged, under a title band per panel
    assert overlay.dtype == np.uint8 and overlay.shape == (3, TITLE_HEIGHT + f * h, 2 * f * w + 4)

    table = format_table(metrics)
    assert "PQ" in table and "Things" in table and f"{100 * metrics['All']['pq']:5.1f}" in table
    assert scalar_metrics(metrics)["PQ"] == pytest.approx(100 * metrics["All"]["pq"])


def test_evaluate_ap_equals_cocoeval_on_the_written_results(tmp_path):
    samples = make_samples(6, seed=1)
    writer = CocoInstanceWriter(tmp_path / "results.json")
    metrics = evaluate(
        ColourNet(),
        batches(samples),
        InstancePredictor(topk=6),
        InstanceEvaluator(num_classes=3),
        callbacks=[writer],
        progress=False,
    )
    writer.close()
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 6 * 6 and all("bbox" not in r for r in results)
    images = [{"id": s["image_id"], "height": s["orig_size"][0], "width": s["orig_size"][1]} for s in samples]
    truth = [{**a, "image_id": s["image_id"]} for s in samples for a in s["instances"]]
    expected = coco_mask_ap(images, truth, results, num_classes=3)
    assert metrics["AP"] == pytest.approx(expected["AP"]) and metrics["AP"] > 0.1
    assert "AP50" in format_table(metrics)
    # the file loads as COCO results (what the evaluation server reads)
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": [{**a, "id": i + 1} for i, a in enumerate(truth)],
        "categories": [{"id": c} for c in range(3)],
    }
    coco.createIndex()
    assert len(coco.loadRes(str(tmp_path / "results.json")).getAnnIds()) == len(results)


def test_per_block_metrics_and_semantic_writer(tmp_path):
    samples = make_samples(4, seed=2)
    writer = SemanticPngWriter(tmp_path / "sem", label_ids=[7, 8, 11])
    metrics = evaluate(
        ColourNet(intermediate=True),
        batches(samples),
        SemanticPredictor(),
        SemanticEvaluator(num_classes=3),
        per_block=True,
        callbacks=[writer],
        progress=False,
    )
    assert set(metrics["per_block"]) == {0, 1}
    assert metrics["per_block"][0]["miou"] == metrics["miou"] > 0.7  # identical predictions at every point
    assert set(scalar_metrics(metrics)) >= {"mIoU", "block0/mIoU", "block1/mIoU"}
    assert "before query block 1" in format_table(metrics)
    written = np.asarray(Image.open(tmp_path / "sem" / "img000.png"))
    assert written.shape == tuple(samples[0]["orig_size"]) and set(np.unique(written)) <= {7, 8, 11}
    with pytest.raises(ValueError, match="masked_attn"):
        evaluate(
            ColourNet(),
            batches(samples),
            SemanticPredictor(),
            SemanticEvaluator(num_classes=3),
            per_block=True,
            progress=False,
        )


def test_cityscapes_label_ids_map_train_ids_to_label_ids():
    ids = cityscapes_label_ids()
    assert len(ids) == 19 and ids[0] == 7 and ids[-1] == 33


def test_shard_sampler_splits_without_repeats():
    shards = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7)) and [len(s) for s in shards] == [3, 2, 2]


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_pipelined_evaluation_equals_the_inline_loop(task):
    samples = make_samples(7, seed=3)
    predictor = {
        "panoptic": PanopticPredictor(thing_classes=[0, 1]),
        "instance": InstancePredictor(topk=6),
        "semantic": SemanticPredictor(),
    }[task]

    def run(pipeline: bool):
        evaluator = {
            "panoptic": PanopticEvaluator(num_classes=3, thing_classes=[0, 1]),
            "instance": InstanceEvaluator(num_classes=3),
            "semantic": SemanticEvaluator(num_classes=3),
        }[task]
        seen = []  # (thread, image ids) of each callback call

        def callback(predictions, batch):
            seen.append((threading.get_ident(), [s["image_id"] for s in batch]))

        metrics = evaluate(
            ColourNet(),
            batches(samples, 2),
            predictor,
            evaluator,
            callbacks=[callback],
            progress=False,
            pipeline=pipeline,
        )
        return metrics, seen

    pipelined, seen_pipelined = run(True)
    inline, seen_inline = run(False)
    assert json.dumps(pipelined, sort_keys=True) == json.dumps(inline, sort_keys=True)  # nan == nan
    order = [ids for _, ids in seen_inline]
    assert [ids for _, ids in seen_pipelined] == order  # batch after batch, in order
    assert {thread for thread, _ in seen_inline} == {threading.get_ident()}
    assert threading.get_ident() not in {thread for thread, _ in seen_pipelined}  # off the loop's thread


def test_metric_pipeline_raises_the_workers_error_and_bounds_the_queue():
    started = threading.Event()
    release = threading.Event()
    done = []

    def slow(x):
        started.set()
        release.wait(5)
        done.append(x)

    pipeline = MetricPipeline(depth=2)
    for i in range(2):
        pipeline.submit(slow, i)
    started.wait(5)
    assert done == []  # submit returned while the first item was still running
    release.set()
    pipeline.submit(slow, 2)  # a third waits until at most two are pending
    assert done[:1] == [0]
    pipeline.submit(slow, 3)

    def fail(x):
        raise ValueError(f"bad prediction {x}")

    pipeline.submit(fail, 4)
    with pytest.raises(ValueError, match="bad prediction 4"):
        pipeline.close()
    assert done == [0, 1, 2, 3]
