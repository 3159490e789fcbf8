"""Build a dataset from its config node (conf/dataset/*.yaml) for one task and split."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from eomt.data.records import PackedRecords
from eomt.data.transforms import TrainTransform
from eomt.errors import ConfigError

TASKS = ("panoptic", "semantic", "instance")


def supported_tasks(dataset_cfg: DictConfig) -> list[str]:
    """The tasks a dataset config has annotations for (its task nodes), read without resolving them."""
    return [task for task in TASKS if task in dataset_cfg]


def check_task(dataset_cfg: DictConfig, task: str) -> None:
    """One-line error when the dataset has no annotations for `task`."""
    supported = supported_tasks(dataset_cfg)
    if task not in supported:
        name = dataset_cfg.get("name", "?")
        raise ValueError(f"dataset {name} has no {task} annotations; supported: {', '.join(supported)}")


def build_dataset(dataset_cfg: DictConfig, task: str, split: str, train: bool) -> Dataset:
    """The task node's dataset for `split`, with the training transform when `train`.

    For training, images whose target is empty are left out as the authors' release does, unless
    `dataset.skip_empty_train` is false (`eomt.data.empty`); evaluation keeps every image.
    `dataset_cfg` is the composed config's `dataset` node (its interpolations resolve against the
    whole config).
    """
    check_task(dataset_cfg, task)
    transform = None
    if train:
        transform = TrainTransform(
            crop_size=list(dataset_cfg.crop_size),
            scale_range=list(dataset_cfg.scale_range),
            color_jitter=bool(dataset_cfg.color_jitter),
        )
    try:
        dataset = instantiate(
            dataset_cfg[task].dataset,
            split=split,
            transform=transform,
            skip_empty=train and bool(dataset_cfg.get("skip_empty_train", True)),
        )
    except InstantiationException as e:
        # Hydra wraps the dataset's own one-line error (missing zip, mismatched annotations) in a
        # multi-line message; show the user the original.
        if isinstance(e.__cause__, (FileNotFoundError, ValueError)):
            raise e.__cause__ from None
        raise
    if dataset_cfg.get("max_image_pixels") is not None and hasattr(dataset, "max_image_pixels"):
        dataset.max_image_pixels = int(dataset_cfg.max_image_pixels)  # travels with it into the workers
    return first_images(dataset, dataset_cfg.get(f"max_{split}_images"))


def first_images(dataset: Dataset, count: int | None) -> Dataset:
    """Keep the split's first `count` images (`dataset.max_train_images`, `max_val_images`: debug runs)."""
    if count is None or count >= len(dataset):
        return dataset
    if count < 1:
        raise ConfigError(f"dataset.max_*_images={count} must be >= 1, or null for the whole split")
    if not hasattr(dataset, "records"):  # not one of ours (eomt.data.base)
        return Subset(dataset, range(count))
    dataset.records = PackedRecords(dataset.records[i] for i in range(count))
    return dataset
