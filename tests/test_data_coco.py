"""COCO panoptic / instance / semantic-from-panoptic loaders on generated zips in the published layout."""

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from eomt.data import (
    CocoInstance,
    CocoPanoptic,
    CocoSemantic,
    CorruptFileError,
    CorruptSampleWarning,
    TrainTransform,
    collate_train,
    count_skipped,
)
from eomt.data.decode import rgb_to_id
from eomt.data.synthetic import generate

SIZE = (40, 56)
NAMES = ["disc", "box", "triangle", "sky", "ground"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate("coco", tmp_path_factory.mktemp("coco"), num_train=8, num_val=3, size=SIZE, seed=0)


@pytest.fixture()
def copy(root, tmp_path):
    """A private copy of the generated dataset, to damage."""
    return shutil.copytree(root, tmp_path / "coco")


def _json(root, member, archive="panoptic_annotations_trainval2017.zip"):
    with zipfile.ZipFile(root / archive) as z:
        return json.loads(z.read(member))


def _rewrite(archive, member, data: bytes) -> None:
    """Replace one member of a zip (keeping the others and their compression)."""
    with zipfile.ZipFile(archive) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(archive, "w") as z:
        for info, old in members:
            z.writestr(info, data if info.filename == member else old)


def test_published_layout_and_sizes(root):
    with zipfile.ZipFile(root / "panoptic_annotations_trainval2017.zip") as z:
        assert {
            "annotations/panoptic_train2017.json",
            "annotations/panoptic_train2017.zip",
            "annotations/panoptic_val2017.json",
            "annotations/panoptic_val2017.zip",
        } <= set(z.namelist())
        with zipfile.ZipFile(io.BytesIO(z.read("annotations/panoptic_val2017.zip"))) as inner:
            assert all(n.startswith("panoptic_val2017/") and n.endswith(".png") for n in inner.namelist())
    with zipfile.ZipFile(root / "annotations_trainval2017.zip") as z:
        assert {"annotations/instances_train2017.json", "annotations/instances_val2017.json"} <= set(
            z.namelist()
        )
    assert len(CocoPanoptic(root, "train")) == 8
    val = CocoPanoptic(root, "val")
    assert len(val) == 3
    sample = val[0]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, *SIZE)
    assert sample["masks"].dtype == torch.bool and sample["masks"].shape[1:] == SIZE
    assert sample["labels"].dtype == torch.int64 and len(sample["labels"]) == len(sample["masks"])
    assert sample["orig_size"] == SIZE
    assert isinstance(sample["image_id"], int) and sample["file_name"] == f"{sample['image_id']:012d}.jpg"


def test_category_ids_map_to_contiguous_ids_things_first(root):
    dataset = CocoPanoptic(root, "train")
    # JSON ids: disc 1, sky 2 (stuff), box 3, triangle 7, ground 150 (stuff).
    assert dataset.category_ids == {1: 0, 3: 1, 7: 2, 2: 3, 150: 4}
    assert dataset.class_names == NAMES
    assert dataset.thing_classes == [0, 1, 2]
    annotations = _json(root, "annotations/panoptic_train2017.json")["annotations"]
    for index, ann in enumerate(annotations):
        labels = dataset[index]["labels"].tolist()
        assert labels == [dataset.category_ids[s["category_id"]] for s in ann["segments_info"]]


def test_panoptic_ids_decode_from_rgb(root):
    assert rgb_to_id(np.array([[[0x56, 0x34, 0x12]]], dtype=np.uint8))[0, 0] == 0x123456
    dataset = CocoPanoptic(root, "train")
    annotations = _json(root, "annotations/panoptic_train2017.json")["annotations"]
    assert max(s["id"] for ann in annotations for s in ann["segments_info"]) >= 65536  # blue channel in use
    for index, ann in enumerate(annotations):
        sample = dataset[index]
        id_map, segments = sample["panoptic"]["id_map"], sample["panoptic"]["segments"]
        assert [s["id"] for s in segments] == [s["id"] for s in ann["segments_info"]]
        for segment, mask, info in zip(segments, sample["masks"], ann["segments_info"], strict=True):
            assert int(mask.sum()) == info["area"] == segment["area"]
            assert torch.equal(mask, id_map == segment["id"])
        void = ~sample["masks"].any(0)
        assert torch.equal(void, id_map == 0)


def test_crowd_segments_are_flagged(root):
    dataset = CocoPanoptic(root, "train")
    annotations = _json(root, "annotations/panoptic_train2017.json")["annotations"]
    crowd_seen = 0
    for index, ann in enumerate(annotations):
        flags = dataset[index]["is_crowd"].tolist()
        assert flags == [bool(s["iscrowd"]) for s in ann["segments_info"]]
        crowd_seen += sum(flags)
    assert crowd_seen > 0


def test_instances_match_the_panoptic_things(root):
    panoptic, instance = CocoPanoptic(root, "val"), CocoInstance(root, "val")
    assert instance.class_names == NAMES[:3] and instance.category_ids == {1: 0, 3: 1, 7: 2}
    for index in range(len(instance)):
        p, i = panoptic[index], instance[index]
        assert p["image_id"] == i["image_id"]
        things = p["labels"] < 3
        assert i["labels"].tolist() == p["labels"][things].tolist()
        assert i["is_crowd"].tolist() == p["is_crowd"][things].tolist()
        assert torch.equal(
            i["masks"], p["masks"][things]
        )  # polygons and crowd RLE decode to the PNG's pixels
        for ann, mask in zip(i["instances"], i["masks"], strict=True):
            decoded = mask_utils.decode(
                {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            )
            assert np.array_equal(decoded.astype(bool), mask.numpy())
            assert ann["area"] == mask.sum().item() and len(ann["bbox"]) == 4


def test_semantic_from_panoptic(root):
    panoptic, semantic = CocoPanoptic(root, "train"), CocoSemantic(root, "train", class_names=NAMES)
    for index in range(3):
        p, s = panoptic[index], semantic[index]
        expected = torch.full(SIZE, 255, dtype=torch.int64)
        for mask, label in zip(p["masks"], p["labels"], strict=True):
            expected[mask] = label
        assert torch.equal(s["semantic"], expected)
        assert s["labels"].tolist() == sorted(set(p["labels"].tolist()))
        for mask, label in zip(s["masks"], s["labels"], strict=True):
            assert torch.equal(mask, expected == label)


def test_missing_zip_names_the_file_and_its_source(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"panoptic_annotations_trainval2017\.zip \(get it from http"):
        CocoPanoptic(tmp_path, "train")
    shutil.copy(root / "annotations_trainval2017.zip", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"train2017\.zip \(get it from http://images\.cocodataset\.org"
    ):
        CocoInstance(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        CocoPanoptic(root, "test")


def test_unknown_category_and_mismatched_images_are_errors(copy):
    archive = copy / "panoptic_annotations_trainval2017.zip"
    data = _json(copy, "annotations/panoptic_val2017.json")
    data["annotations"][0]["segments_info"][0]["category_id"] = 99
    _rewrite(archive, "annotations/panoptic_val2017.json", json.dumps(data).encode())
    with pytest.raises(ValueError, match=r"category ids \[99\]"):
        CocoPanoptic(copy, "val")

    data = _json(copy, "annotations/instances_val2017.json", "annotations_trainval2017.zip")
    data["images"][1]["file_name"] = "000000999999.jpg"
    _rewrite(
        copy / "annotations_trainval2017.zip", "annotations/instances_val2017.json", json.dumps(data).encode()
    )
    with pytest.raises(
        ValueError, match=r"1 images missing from .*val2017\.zip \(e\.g\. val2017/000000999999\.jpg\)"
    ):
        CocoInstance(copy, "val")


def test_configured_class_names_must_match_the_json(root):
    with pytest.raises(ValueError, match="differ from the configured class_names"):
        CocoPanoptic(root, "val", class_names=["person", "bicycle"])
    assert len(CocoPanoptic(root, "val", class_names=NAMES)) == 3


def _corrupt_first_image(copy) -> str:
    name = f"train2017/{CocoPanoptic(copy, 'train')[0]['file_name']}"
    _rewrite(copy / "train2017.zip", name, b"\xff\xd8 not a jpeg")
    return name


def test_corrupt_image_is_skipped_with_a_warning(copy):
    name = _corrupt_first_image(copy)
    dataset = CocoPanoptic(copy, "train")
    second = dataset[1]
    with pytest.warns(CorruptSampleWarning, match=name.split("/")[-1]):
        sample = dataset[0]
    assert sample["skipped"] == 1 and sample["image_id"] == second["image_id"]
    assert dataset.skipped == 1 and second["skipped"] == 0
    with pytest.raises(CorruptFileError, match=name.split("/")[-1]):
        CocoPanoptic(copy, "train", on_corrupt="raise")[0]


def test_corrupt_png_in_the_nested_zip_is_skipped(copy):
    archive = copy / "panoptic_annotations_trainval2017.zip"
    with zipfile.ZipFile(archive) as z:
        inner = z.read("annotations/panoptic_val2017.zip")
    buffer = io.BytesIO(inner)
    with zipfile.ZipFile(buffer) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for k, (info, data) in enumerate(members):
            z.writestr(info, data[: len(data) // 2] if k == 2 else data)  # truncated PNG
    _rewrite(archive, "annotations/panoptic_val2017.zip", out.getvalue())
    dataset = CocoPanoptic(copy, "val")
    with pytest.warns(CorruptSampleWarning, match=members[2][0].filename.split("/")[-1]):
        sample = dataset[2]
    assert sample["skipped"] == 1 and sample["image_id"] == dataset[0]["image_id"]  # wrapped around


def test_dataloader_with_two_workers_reports_skips(copy):
    _corrupt_first_image(copy)
    torch.manual_seed(0)
    dataset = CocoPanoptic(copy, "train", transform=TrainTransform((32, 32), (0.5, 1.5)))
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_train)
    images, skipped = 0, 0
    for batch_images, targets in loader:  # the warning is raised (and shown) in the worker
        assert batch_images.shape[1:] == (3, 32, 32) and batch_images.dtype == torch.uint8
        for target in targets:
            assert target["masks"].shape[1:] == (32, 32) and len(target["labels"]) == len(target["masks"])
        images += len(batch_images)
        skipped += count_skipped(targets)
    assert images == 8
    assert skipped == 1  # counted in a worker, learned by the main process through the samples
    assert dataset.skipped == 0  # this process skipped nothing itself


def test_corrupt_jpeg_bytes_are_detected_not_just_headers(root, tmp_path):
    """A JPEG cut short is caught too (decoders may otherwise return a partial image)."""
    with zipfile.ZipFile(root / "val2017.zip") as z:
        name = z.namelist()[0]
        data = z.read(name)
    Image.open(io.BytesIO(data)).load()  # the original is fine
    copy = shutil.copytree(root, tmp_path / "c")
    _rewrite(copy / "val2017.zip", name, data[:200])
    with pytest.raises(CorruptFileError):
        CocoInstance(copy, "val", on_corrupt="raise")[0]


@pytest.mark.slow
def test_dataloader_with_a_spawned_worker(root):
    """Spawned workers get the dataset pickled: zip handles are dropped and reopened there."""
    dataset = CocoInstance(root, "val")
    dataset[0]  # open the handles in this process first
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    ids = [sample["image_id"] for sample in loader]
    assert ids == [dataset[i]["image_id"] for i in range(len(dataset))]


def test_index_is_built_without_decoding_images(copy):
    """Start-up reads only the JSON and the zips' file lists: unreadable pixels surface on access."""
    with zipfile.ZipFile(copy / "val2017.zip") as z:
        names = z.namelist()
    for name in names:
        _rewrite(copy / "val2017.zip", name, b"garbage")
    dataset = CocoPanoptic(copy, "val")
    assert len(dataset) == 3
    with pytest.warns(CorruptSampleWarning), pytest.raises(RuntimeError, match="every one of the 3 samples"):
        dataset[0]
    assert dataset.skipped == 3


def test_generated_coco_categories_read_with_the_coco_config(tmp_path, caplog):
    """`python -m eomt.data.synthetic --layout coco` writes COCO's own categories: dataset=coco reads it."""
    from eomt.config import compose
    from eomt.data.synthetic import main

    main(["--layout", "coco", "--out", str(tmp_path), "--train", "6", "--val", "2", "--size", "40x56"])
    coco = compose(["dataset=coco"]).dataset
    with caplog.at_level("INFO"):
        dataset = CocoPanoptic(tmp_path, "train", class_names=list(coco.class_names), skip_empty=True)
    assert dataset.thing_classes == list(coco.thing_classes)
    scene_classes = {
        coco.class_names.index(n) for n in ("sports ball", "tv", "kite", "sky-other-merged", "dirt-merged")
    }
    labels = {int(label) for i in range(len(dataset)) for label in dataset[i]["labels"]}
    assert labels and labels <= scene_classes
    assert f"COCO panoptic in {tmp_path}: left out" in caplog.text  # names the data it reads
    instances = CocoInstance(
        tmp_path, "val", class_names=list(compose(["dataset=coco", "task=instance"]).dataset.class_names)
    )
    assert len(instances) == 2


def _enlarge_first_image(copy) -> str:
    """The first training image replaced by a PNG of 4x its pixels under its .jpg name."""
    name = f"train2017/{CocoPanoptic(copy, 'train')[0]['file_name']}"
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE[1] * 2, SIZE[0] * 2)).save(buffer, format="PNG")
    _rewrite(copy / "train2017.zip", name, buffer.getvalue())
    return name


def test_image_over_the_pixel_limit_is_skipped_or_one_line(copy, capsys):
    from eomt.config import compose
    from eomt.data import build_dataset
    from eomt.errors import DataError, user_errors

    name = _enlarge_first_image(copy)
    limit = SIZE[0] * SIZE[1] + 1  # the others are below it; the large one is over twice it
    dataset = CocoPanoptic(copy, "train")
    dataset.max_image_pixels = limit
    second = dataset[1]
    with pytest.warns(
        CorruptSampleWarning, match=f"{name}.*DecompressionBombError.*dataset.max_image_pixels"
    ):
        sample = dataset[0]
    assert sample["skipped"] == 1 and sample["image_id"] == second["image_id"]
    assert Image.MAX_IMAGE_PIXELS != limit  # set only while the dataset reads

    cfg = compose(["dataset=synthetic", "dataset.on_corrupt=raise", f"dataset.max_image_pixels={limit}"])
    cfg.dataset.panoptic.dataset = {
        "_target_": "eomt.data.CocoPanoptic",
        "root": str(copy),
        "on_corrupt": "raise",
    }
    strict = build_dataset(cfg.dataset, "panoptic", "train", train=False)
    loader = DataLoader(strict, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(SystemExit), user_errors():
        next(iter(loader))  # raised in a worker: still one line
    message = capsys.readouterr().err
    assert (
        message.count("\n") == 1 and message.startswith(f"error: {name} in") and "max_image_pixels" in message
    )

    cfg.dataset.max_image_pixels = 4 * limit  # a very large legitimate image: raise the limit
    raised = build_dataset(cfg.dataset, "panoptic", "train", train=False)
    with pytest.raises(DataError, match="sizes disagree .* image \\(80, 112\\)"):  # decoded this time
        raised[0]
