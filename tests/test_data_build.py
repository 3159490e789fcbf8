"""Dataset configs (conf/dataset), build_dataset, collate, and the synthetic dataset's cache."""

import json
import logging
import multiprocessing
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from eomt.config import CONF_DIR
from eomt.data import build_dataset, check_task, collate_eval, collate_train
from eomt.data.sampler import ResumableSampler
from eomt.data.synthetic import ensure_generated, main

CONF = CONF_DIR
SUPPORTED = {
    "coco": {"panoptic", "instance"},
    "ade20k": {"semantic", "panoptic"},
    "cityscapes": {"semantic", "panoptic", "instance"},
    "synthetic": {"panoptic", "semantic", "instance"},
    "custom": {"panoptic"},
}
PRIMARY = {
    "coco": "panoptic",
    "ade20k": "semantic",
    "cityscapes": "semantic",
    "synthetic": "panoptic",
    "custom": "panoptic",
}


@pytest.fixture()
def compose_data(tmp_path, monkeypatch):
    """Compose just the dataset and task groups of conf/ (the rest of train.yaml is not needed)."""
    monkeypatch.setenv("EOMT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EOMT_DATA", str(tmp_path / "data"))
    primary = tmp_path / "primary"
    primary.mkdir()
    (primary / "data_only.yaml").write_text(
        f"defaults:\n  - paths: default\n  - dataset: synthetic\n  - _self_\nhydra:\n  searchpath:\n    - file://{CONF}\n"
    )
    with initialize_config_dir(config_dir=str(primary), version_base=None):
        yield lambda *overrides: compose("data_only", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_each_dataset_defaults_to_its_primary_task_and_switches(compose_data, name):
    assert compose_data(f"dataset={name}").task.name == PRIMARY[name]
    for task in sorted(SUPPORTED[name]):
        cfg = compose_data(f"dataset={name}", f"task={task}")
        assert cfg.task.name == task and cfg.dataset.name == name
        if name == "custom":
            continue  # the user sets the classes
        data = cfg.dataset
        assert len(data.class_names) == data.num_classes
        assert set(data.thing_classes) <= set(range(data.num_classes))
        assert len(data.crop_size) == 2 and len(data.scale_range) == 2 and data.epochs > 0
        assert data.ignore_index == 255 and data.on_corrupt in ("skip", "raise")
        assert data[task].dataset._target_.startswith("eomt.data.")


def test_published_settings(compose_data):
    coco = compose_data("dataset=coco").dataset
    assert (coco.num_classes, coco.epochs, list(coco.crop_size), list(coco.scale_range)) == (
        133,
        12,
        [640, 640],
        [0.1, 2.0],
    )
    assert list(coco.thing_classes) == list(range(80)) and not coco.color_jitter
    assert compose_data("dataset=coco", "task=instance").dataset.num_classes == 80
    ade = compose_data("dataset=ade20k").dataset
    assert (ade.num_classes, ade.epochs, list(ade.crop_size), list(ade.scale_range)) == (
        150,
        31,
        [512, 512],
        [0.5, 2.0],
    )
    assert len(ade.thing_classes) == 100 and ade.color_jitter
    ade_pan = compose_data("dataset=ade20k", "task=panoptic").dataset
    assert (list(ade_pan.crop_size), list(ade_pan.scale_range)) == ([640, 640], [0.1, 2.0])
    city = compose_data("dataset=cityscapes").dataset
    assert (city.num_classes, city.epochs, list(city.crop_size)) == (19, 107, [1024, 1024])
    assert compose_data("dataset=cityscapes", "task=instance").dataset.num_classes == 8
    assert compose_data("dataset=coco").dataset.root.endswith("data/coco")


@pytest.mark.parametrize(
    ("name", "task"), [("coco", "semantic"), ("ade20k", "instance"), ("custom", "instance")]
)
def test_unsupported_task_is_a_one_line_error(compose_data, name, task):
    cfg = compose_data(f"dataset={name}", f"task={task}")
    with pytest.raises(ValueError, match=f"^dataset {name} has no {task} annotations; supported: ") as info:
        build_dataset(cfg.dataset, task, "train", train=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        check_task(cfg.dataset, task)


def test_missing_zip_is_a_one_line_error_through_the_config(compose_data):
    cfg = compose_data("dataset=ade20k")
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016\.zip \(get it from http") as info:
        build_dataset(cfg.dataset, "semantic", "val", train=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("task", "num_classes"), [("panoptic", 5), ("semantic", 5), ("instance", 3)])
def test_synthetic_dataset_for_each_task(compose_data, task, num_classes):
    cfg = compose_data(
        "dataset=synthetic",
        f"task={task}",
        "dataset.generator.num_train=6",
        "dataset.generator.num_val=2",
        "dataset.generator.size=[48,48]",
    )
    assert list(cfg.dataset.crop_size) == [48, 48]
    train = build_dataset(cfg.dataset, task, "train", train=True)
    val = build_dataset(cfg.dataset, task, "val", train=False)
    assert len(train) == 6 and len(val) == 2
    images, targets = collate_train([train[0], train[1]])
    assert images.shape == (2, 3, 48, 48) and images.dtype == torch.uint8
    assert all(t["masks"].shape[1:] == (48, 48) and (t["labels"] < num_classes).all() for t in targets)
    samples = collate_eval([val[0], val[1]])
    eval_key = {"panoptic": "panoptic", "semantic": "semantic", "instance": "instances"}[task]
    assert isinstance(samples, list) and all(
        eval_key in s and s["image"].shape == (3, 48, 48) for s in samples
    )


def test_training_leaves_out_images_without_segments_as_the_release(compose_data, caplog):
    # A COCO panoptic split where 9 of 48 training images (and 1 of 4 val images) have no segment.
    overrides = [
        "dataset=synthetic",
        "dataset.generator.num_train=48",
        "dataset.generator.num_val=4",
        "dataset.generator.size=[32,32]",
    ]
    cfg = compose_data(*overrides)
    folder = ensure_generated(cfg.dataset.root, "coco", 48, 4, (32, 32), seed=0)
    archive = folder / "panoptic_annotations_trainval2017.zip"
    with zipfile.ZipFile(archive) as z:
        members = {info.filename: (info, z.read(info)) for info in z.infolist()}
    for split, count in (("train", 9), ("val", 1)):
        info, data = members[f"annotations/panoptic_{split}2017.json"]
        annotations = json.loads(data)
        for ann in annotations["annotations"][:count]:
            ann["segments_info"] = []
        members[info.filename] = (info, json.dumps(annotations).encode())
    with zipfile.ZipFile(archive, "w") as z:
        for info, data in members.values():
            z.writestr(info, data)

    with caplog.at_level(logging.INFO, logger="eomt.data.empty"):
        train = build_dataset(cfg.dataset, "panoptic", "train", train=True)
    assert "left out 9 of 48 training images" in caplog.text
    sampler = ResumableSampler(train, num_replicas=1, rank=0, seed=0, batch_size=16)
    assert len(sampler) // 16 == (48 - 9) // 16 == 2  # the release's steps per epoch (drop_last), not 3
    assert len(build_dataset(cfg.dataset, "panoptic", "val", train=False)) == 4  # every image is scored
    kept_all = compose_data(*overrides, "dataset.skip_empty_train=false")
    assert len(build_dataset(kept_all.dataset, "panoptic", "train", train=True)) == 48


def test_dataloader_with_two_workers_on_the_synthetic_config(compose_data):
    cfg = compose_data("dataset=synthetic", "dataset.generator.num_train=8", "dataset.generator.num_val=2")
    train = build_dataset(cfg.dataset, "panoptic", "train", train=True)
    torch.manual_seed(0)
    first = [
        t["labels"]
        for _, ts in DataLoader(train, batch_size=4, num_workers=2, collate_fn=collate_train)
        for t in ts
    ]
    torch.manual_seed(0)
    second = [
        t["labels"]
        for _, ts in DataLoader(train, batch_size=4, num_workers=2, collate_fn=collate_train)
        for t in ts
    ]
    assert len(first) == 8
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # same seed, same samples


def _generate_in_child(cache: str, queue) -> None:
    queue.put(str(ensure_generated(cache, "coco", 3, 1, (32, 32), seed=4)))


def test_cache_is_generated_once_even_when_processes_race(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_generate_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    folders = {queue.get(timeout=60) for _ in children}
    for child in children:
        child.join(timeout=60)
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary leftovers
    stamp = (folder / "train2017.zip").stat().st_mtime_ns
    assert ensure_generated(tmp_path, "coco", 3, 1, (32, 32), seed=4) == folder
    assert (folder / "train2017.zip").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("layout", "files"),
    [
        (
            "coco",
            {
                "train2017.zip",
                "val2017.zip",
                "annotations_trainval2017.zip",
                "panoptic_annotations_trainval2017.zip",
            },
        ),
        ("ade20k", {"ADEChallengeData2016.zip", "annotations_instance.zip"}),
        ("cityscapes", {"leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"}),
    ],
)
def test_cli_writes_each_layout(tmp_path, capsys, layout, files):
    main(
        [
            "--layout",
            layout,
            "--out",
            str(tmp_path),
            "--train",
            "2",
            "--val",
            "1",
            "--size",
            "32x48",
            "--seed",
            "1",
        ]
    )
    assert {p.name for p in tmp_path.iterdir()} == files
    assert "wrote" in capsys.readouterr().out
