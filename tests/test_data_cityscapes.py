"""Cityscapes semantic, panoptic and instance loaders on generated zips in the published layout."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from eomt.data import CityscapesInstance, CityscapesPanoptic, CityscapesSemantic
from eomt.data.cityscapes import instance_segments, train_ids
from eomt.data.synthetic import generate

SIZE = (32, 64)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate(
        "cityscapes", tmp_path_factory.mktemp("cityscapes"), num_train=6, num_val=2, size=SIZE, seed=3
    )


def _png(root, member) -> np.ndarray:
    with zipfile.ZipFile(root / "gtFine_trainvaltest.zip") as z:
        return np.asarray(Image.open(io.BytesIO(z.read(member))))


def test_layout_and_sizes(root):
    with zipfile.ZipFile(root / "leftImg8bit_trainvaltest.zip") as z:
        assert "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png" in z.namelist()
    with zipfile.ZipFile(root / "gtFine_trainvaltest.zip") as z:
        assert "gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_instanceIds.png" in z.namelist()
    assert len(CityscapesSemantic(root, "train")) == 6
    sample = CityscapesSemantic(root, "val")[0]
    assert sample["image"].shape == (3, *SIZE) and sample["orig_size"] == SIZE
    assert sample["image_id"] == "frankfurt_000000_000019"


def test_label_ids_map_to_train_ids():
    label_ids = np.array([0, 4, 7, 8, 23, 24, 26, 29, 33, 255], dtype=np.uint8)
    assert train_ids(label_ids).tolist() == [255, 255, 0, 1, 10, 11, 13, 255, 18, 255]


def test_semantic_sample_matches_label_ids(root):
    dataset = CityscapesSemantic(root, "train")
    void_pixels = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        city = sample["image_id"].split("_")[0]
        raw = _png(root, f"gtFine/train/{city}/{sample['image_id']}_gtFine_labelIds.png")
        expected = train_ids(raw)
        assert np.array_equal(sample["semantic"].numpy(), expected)
        void_pixels += int((expected == 255).sum())
        assert sample["labels"].tolist() == sorted(set(np.unique(expected).tolist()) - {255})
    assert void_pixels > 0  # the generated data has unlabeled regions, and they are ignored


def test_instance_ids_decode():
    values = np.array([[7, 7, 26000, 26000], [24, 26001, 26001, 0], [4, 29000, 33002, 33002]], dtype=np.int32)
    id_map, segments = instance_segments(values)
    described = {(s["category_id"], s["iscrowd"], s["area"]) for s in segments}
    # road (stuff), two cars, a person crowd (labelId 24 < 1000), a bicycle; static (4), caravan (29) ignored.
    assert described == {(0, 0, 2), (13, 0, 2), (13, 0, 2), (11, 1, 1), (18, 0, 2)} and len(segments) == 5
    assert (id_map[values == 0] == 0).all() and (id_map[values == 4] == 0).all() and id_map[2, 1] == 0
    cars = {s["id"] for s in segments if s["category_id"] == 13}
    assert {id_map[0, 2], id_map[1, 1]} == cars


def test_panoptic_and_instance_agree_with_instance_ids(root):
    panoptic, instance = CityscapesPanoptic(root, "train"), CityscapesInstance(root, "train")
    crowds = 0
    for index in range(len(panoptic)):
        p, i = panoptic[index], instance[index]
        city = p["image_id"].split("_")[0]
        raw = _png(root, f"gtFine/train/{city}/{p['image_id']}_gtFine_instanceIds.png").astype(np.int64)
        for mask, label, crowd in zip(p["masks"], p["labels"], p["is_crowd"], strict=True):
            values = np.unique(raw[mask.numpy()])
            assert len(values) == 1  # each segment is exactly one instanceIds value
            value = values[0]
            assert train_ids(np.array([value // 1000 if value >= 1000 else value]))[0] == label.item()
            assert crowd.item() == (value < 1000 and label.item() >= 11)
            crowds += int(crowd)
        things = p["labels"] >= 11
        assert (i["labels"] == p["labels"][things] - 11).all() and (i["labels"] < 8).all()
        assert (i["masks"] == p["masks"][things]).all()
        assert i["is_crowd"].tolist() == p["is_crowd"][things].tolist()
        for ann, mask in zip(i["instances"], i["masks"], strict=True):
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask.numpy())
            assert ann["area"] == mask.sum().item()
    assert crowds > 0


def test_missing_zip_and_labels(root, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"leftImg8bit_trainvaltest\.zip \(get it from https://www\.cityscapes"
    ):
        CityscapesSemantic(tmp_path, "train")
    (tmp_path / "leftImg8bit_trainvaltest.zip").write_bytes(
        (root / "leftImg8bit_trainvaltest.zip").read_bytes()
    )
    with (
        zipfile.ZipFile(root / "gtFine_trainvaltest.zip") as src,
        zipfile.ZipFile(tmp_path / "gtFine_trainvaltest.zip", "w") as dst,
    ):
        for name in src.namelist():
            if not name.endswith("frankfurt_000001_000019_gtFine_instanceIds.png"):
                dst.writestr(name, src.read(name))
    assert len(CityscapesSemantic(tmp_path, "val")) == 2
    with pytest.raises(ValueError, match=r"1 gtFine instanceIds PNGs missing .*frankfurt_000001_000019"):
        CityscapesPanoptic(tmp_path, "val")
