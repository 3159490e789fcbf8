"""Images/s of evaluation's own work (no network): post-processing and metrics.

    python bench/eval.py                       # CPU, a few images
    python bench/eval.py --device cuda --images 50

- panoptic at 640: synthetic logits of EoMT's shape (200 queries, 133 classes + no object,
  160x160 mask logits, 30 confident queries tiling the image) for 640x480 images ->
  letterbox revert + Mask2Former rule (PanopticPredictor's path) -> per-image PQ statistics
  against a synthetic ground truth (PanopticEvaluator.update);
- semantic at 512: ADE20K-sized 512x683 images through SemanticPredictor's sliding windows with a
  stand-in network that returns random logits (100 queries, 150 classes) -> confusion matrix.
Times are per image, the median of `--repeats` passes over `--images` images after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from eomt.errors import user_errors
from eomt.inference import SemanticPredictor
from eomt.inference.postprocess import panoptic_keep, panoptic_segments, thing_mask
from eomt.inference.resize import letterbox, unletterbox
from eomt.metrics import PanopticEvaluator, SemanticEvaluator

NUM_CLASSES, NUM_THINGS, QUERIES = 133, 80, 200


def nearest_seed(seeds: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) index of the nearest seed (normalised (y, x) in [0, 1]): a partition into cells."""
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    d = (ys[None] - seeds[:, :1, None]) ** 2 + (xs[None] - seeds[:, 1:, None]) ** 2
    return d.argmin(0)


def synthetic_panoptic(
    rng: np.random.Generator, device: torch.device, orig=(480, 640), crop=(640, 640), segments=30
):
    """EoMT-shaped logits for one image whose confident queries tile it, and the matching ground truth."""
    box = letterbox(torch.zeros((3, *orig), dtype=torch.uint8), crop)  # where the image sits in the crop
    seeds = rng.random((segments, 2))
    labels = rng.integers(NUM_CLASSES, size=segments)
    cells = torch.from_numpy(nearest_seed(seeds, box.resized_size[0] // 4, box.resized_size[1] // 4)).to(
        device
    )
    mask_logits = torch.full((QUERIES, crop[0] // 4, crop[1] // 4), -8.0, device=device)
    region = mask_logits[:segments, : cells.shape[0], : cells.shape[1]]
    region[:] = torch.where(cells[None] == torch.arange(segments, device=device)[:, None, None], 8.0, -8.0)
    mask_logits += torch.randn_like(mask_logits)
    class_logits = torch.randn(QUERIES, NUM_CLASSES + 1, device=device)
    class_logits[:, -1] += 6  # most queries: no object
    class_logits[torch.arange(segments), torch.from_numpy(labels).to(device)] += 12
    gt = nearest_seed(seeds, *orig).astype(np.int32) + 1
    gt[:, :8] = 0  # some void
    segments_info = [
        {"id": i + 1, "category_id": int(labels[i]), "iscrowd": 0, "area": int((gt == i + 1).sum())}
        for i in range(segments)
        if (gt == i + 1).any()
    ]
    sample = {"image_id": 0, "panoptic": {"id_map": torch.from_numpy(gt), "segments": segments_info}}
    return mask_logits, class_logits, box, sample


def per_image_seconds(work: Callable[[int], None], images: int, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    work(0)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for i in range(images):
            work(i)
        sync()
        times.append((time.perf_counter() - start) / images)
    return statistics.median(times)


class RandomLogits(nn.Module):
    """Stand-in network: random EoMT-shaped outputs (the network's cost is not measured here)."""

    def __init__(self, img_size: int, num_queries: int, num_classes: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.num_queries, self.num_classes = num_queries, num_classes
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor):
        b, _, h, w = images.shape
        masks = torch.randn(b, self.num_queries, h // 4, w // 4, device=images.device)
        classes = torch.randn(b, self.num_queries, self.num_classes + 1, device=images.device)
        return [masks], [classes]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    cases = [synthetic_panoptic(rng, device) for _ in range(args.images)]
    is_thing = thing_mask(NUM_CLASSES, range(NUM_THINGS), device)
    predictions = [None] * len(cases)

    def postprocess(i: int) -> None:
        mask_logits, class_logits, box, _ = cases[i]
        kept, scores, labels = panoptic_keep(class_logits, 0.8)
        id_map, segments = panoptic_segments(
            unletterbox(mask_logits[kept], box), scores, labels, is_thing, 0.8
        )
        predictions[i] = {"id_map": id_map, "segments": segments}

    evaluator = PanopticEvaluator(num_classes=NUM_CLASSES, thing_classes=range(NUM_THINGS))

    def pq_update(i: int) -> None:
        evaluator.update([predictions[i]], [cases[i][3]])

    post = per_image_seconds(postprocess, args.images, args.repeats, device)
    metric = per_image_seconds(pq_update, args.images, args.repeats, device)
    kept = np.mean([len(p["segments"]) for p in predictions])
    print(f"panoptic 640 ({device}, 640x480 images, {kept:.0f} segments/image):")
    print(f"  post-processing  {1 / post:8.1f} images/s  ({1000 * post:.1f} ms)")
    print(f"  PQ statistics    {1 / metric:8.1f} images/s  ({1000 * metric:.1f} ms)")
    print(f"  both             {1 / (post + metric):8.1f} images/s")

    model = RandomLogits(512, num_queries=100, num_classes=150).to(device)
    predictor = SemanticPredictor()
    images = [torch.randint(0, 256, (3, 512, 683), dtype=torch.uint8) for _ in range(args.images)]
    inputs = [predictor.prepare(image, model.img_size) for image in images]  # the loader's workers' part
    targets = [{"image_id": i, "semantic": torch.randint(0, 150, (512, 683))} for i in range(args.images)]
    semantic_evaluator = SemanticEvaluator(num_classes=150)

    def semantic(i: int) -> None:
        semantic_evaluator.update(predictor(model, [inputs[i]]), [targets[i]])

    sem = per_image_seconds(semantic, args.images, args.repeats, device)
    print(f"semantic 512 ({device}, 512x683 images, 2 windows each, random logits):")
    print(f"  windows + scores + merge + mIoU update  {1 / sem:8.1f} images/s  ({1000 * sem:.1f} ms)")


if __name__ == "__main__":
    with user_errors():
        main()
