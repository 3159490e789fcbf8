"""Batching for the DataLoader: training batches stack crops, evaluation batches keep samples."""

from __future__ import annotations

from collections.abc import Callable

import torch


def collate_train(batch: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """(images uint8 (B, 3, H, W), one target dict of tensors per image).

    Targets hold `masks` (N, H, W) bool, `labels` (N,) int64, `is_crowd` (N,) bool and `skipped`,
    a 0-d int64 tensor counting the corrupt files skipped to produce that sample (see
    eomt.data.base): the training loop sums it (`count_skipped`) to learn of skips made inside
    DataLoader workers.
    """
    images = torch.stack([sample["image"] for sample in batch])
    targets = [
        {
            "masks": sample["masks"],
            "labels": sample["labels"],
            "is_crowd": sample["is_crowd"],
            "skipped": torch.tensor(int(sample.get("skipped", 0))),
        }
        for sample in batch
    ]
    return images, targets


def collate_eval(batch: list[dict], prepare: Callable[[torch.Tensor], object] | None = None) -> list[dict]:
    """The untransformed samples as a list (their images differ in size).

    With `prepare` (a predictor's `prepare` bound to the model's crop, e.g.
    `partial(collate_eval, prepare=partial(predictor.prepare, crop=crop))`), each sample also gets
    its network input under "input", made here, in the DataLoader's workers.
    """
    if prepare is None:
        return list(batch)
    return [{**sample, "input": prepare(sample["image"])} for sample in batch]


def count_skipped(items: list[dict]) -> int:
    """Corrupt files skipped to produce these samples or targets."""
    return sum(int(item.get("skipped", 0)) for item in items)
