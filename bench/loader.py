"""Data loader throughput: images/s of the COCO panoptic training pipeline for 0, 1 and 2 workers.

Reads a generated COCO-layout dataset (zips in the published layout, 640x480 images) through
CocoPanoptic + TrainTransform (640 crop, scale 0.1-2.0) + collate_train, as training does.

    python bench/loader.py [--images 300] [--workers 0 1 2] [--batch-size 8] [--data DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from eomt.data import CocoPanoptic, TrainTransform, collate_train
from eomt.data.synthetic import ensure_generated
from eomt.errors import user_errors


def throughput(dataset: CocoPanoptic, workers: int, batch_size: int) -> float:
    """Images per second after the first batch (which pays for worker start-up)."""
    torch.manual_seed(0)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=True,
        collate_fn=collate_train,
        persistent_workers=False,
    )
    batches = iter(loader)
    next(batches)
    start, images = time.perf_counter(), 0
    for batch_images, _ in batches:
        images += len(batch_images)
    return images / (time.perf_counter() - start)


def stage_costs(dataset: CocoPanoptic, count: int) -> tuple[float, float]:
    """Milliseconds per image to read + decode a sample, and to augment it, in this process."""
    torch.manual_seed(0)
    count = min(count, len(dataset))
    start = time.perf_counter()
    samples = [dataset.load(dataset.records[i]) for i in range(count)]
    read = time.perf_counter() - start
    start = time.perf_counter()
    for sample in samples:
        dataset.transform(sample)
    return 1000 * read / count, 1000 * (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data", type=Path, default=None, help="cache folder (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.data or Path(tmp)
        start = time.perf_counter()
        root = ensure_generated(cache, "coco", args.images, 1, (480, 640), seed=0)
        print(
            f"{args.images} 640x480 images ready in {time.perf_counter() - start:.1f} s (generated unless cached)"
        )
        start = time.perf_counter()
        dataset = CocoPanoptic(root, "train", transform=TrainTransform((640, 640), (0.1, 2.0)))
        print(f"index built in {time.perf_counter() - start:.2f} s")
        torch.set_num_threads(1)  # as in a DataLoader worker; the main process competes with them
        read_ms, augment_ms = stage_costs(dataset, 50)
        print(f"per image, one thread: read+decode {read_ms:.1f} ms, augment {augment_ms:.1f} ms")
        for workers in args.workers:
            rate = throughput(dataset, workers, args.batch_size)
            print(f"workers={workers}: {rate:.1f} images/s")


if __name__ == "__main__":
    with user_errors():
        main()
