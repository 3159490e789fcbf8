"""ADE20K semantic and panoptic loaders on generated zips in the published layout."""

import io
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from eomt.data import ADE20KPanoptic, ADE20KSemantic
from eomt.data.ade20k import INSTANCE_TO_SEMANTIC, THING_CLASSES, panoptic_pngs_empty, semantic_classes
from eomt.data.synthetic import generate

SIZE = (48, 40)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate("ade20k", tmp_path_factory.mktemp("ade20k"), num_train=5, num_val=3, size=SIZE, seed=1)


def _png(root, archive, member) -> np.ndarray:
    with zipfile.ZipFile(root / archive) as z:
        return np.asarray(Image.open(io.BytesIO(z.read(member))))


def test_layout_and_sizes(root):
    with zipfile.ZipFile(root / "ADEChallengeData2016.zip") as z:
        names = set(z.namelist())
    assert "ADEChallengeData2016/images/training/ADE_train_00000001.jpg" in names
    assert "ADEChallengeData2016/annotations/validation/ADE_val_00000003.png" in names
    assert len(ADE20KSemantic(root, "train")) == 5
    val = ADE20KSemantic(root, "val")
    assert len(val) == 3
    sample = val[0]
    assert sample["image"].shape == (3, *SIZE) and sample["image_id"] == "ADE_val_00000001"
    assert sample["orig_size"] == SIZE and sample["semantic"].shape == SIZE


def test_label_zero_is_ignored_and_labels_shift_down():
    assert semantic_classes(np.array([0, 1, 150], dtype=np.uint8)).tolist() == [255, 0, 149]
    assert len(THING_CLASSES) == 100 and len(set(THING_CLASSES)) == 100 and max(THING_CLASSES) == 149


def test_semantic_sample_matches_the_png(root):
    dataset = ADE20KSemantic(root, "train")
    for index in range(len(dataset)):
        sample = dataset[index]
        raw = _png(
            root,
            "ADEChallengeData2016.zip",
            f"ADEChallengeData2016/annotations/training/{sample['image_id']}.png",
        ).astype(np.int64)
        expected = np.where(raw == 0, 255, raw - 1)
        assert np.array_equal(sample["semantic"].numpy(), expected)
        assert sample["labels"].tolist() == sorted(set(np.unique(expected).tolist()) - {255})
        for mask, label in zip(sample["masks"], sample["labels"], strict=True):
            assert np.array_equal(mask.numpy(), expected == label.item())
        assert not sample["is_crowd"].any()


def test_panoptic_things_come_from_the_instance_png(root):
    dataset = ADE20KPanoptic(root, "train")
    thing_seen = stuff_seen = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        instance = _png(
            root, "annotations_instance.zip", f"annotations_instance/training/{sample['image_id']}.png"
        )
        semantic = semantic_classes(
            _png(
                root,
                "ADEChallengeData2016.zip",
                f"ADEChallengeData2016/annotations/training/{sample['image_id']}.png",
            )
        )
        id_map = sample["panoptic"]["id_map"].numpy()
        for segment, mask, label in zip(
            sample["panoptic"]["segments"], sample["masks"], sample["labels"], strict=True
        ):
            assert segment["category_id"] == label.item() and segment["area"] == mask.sum().item()
            assert np.array_equal(mask.numpy(), id_map == segment["id"])
            if label.item() in THING_CLASSES:
                instance_ids = np.unique(instance[..., 1][mask.numpy()])
                assert len(instance_ids) == 1 and instance_ids[0] > 0  # exactly one instance
                r = np.unique(instance[..., 0][mask.numpy()])
                assert INSTANCE_TO_SEMANTIC[r[0] - 1] - 1 == label.item()  # R = instance class -> 150 classes
                thing_seen += 1
            else:
                assert np.array_equal(mask.numpy(), semantic == label.item())  # stuff: the whole class region
                stuff_seen += 1
        # Thing-class pixels without an instance (the generator's crowds) are void.
        unowned_things = np.isin(semantic, THING_CLASSES) & (instance[..., 1] == 0)
        assert (id_map[unowned_things] == 0).all()
    assert thing_seen > 0 and stuff_seen > 0


def test_missing_zips_and_annotations(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016\.zip \(get it from http"):
        ADE20KSemantic(tmp_path, "train")
    shutil.copy(root / "ADEChallengeData2016.zip", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"annotations_instance\.zip \(get it from .*zip -r -0"):
        ADE20KPanoptic(tmp_path, "val")
    with (
        zipfile.ZipFile(root / "annotations_instance.zip") as src,
        zipfile.ZipFile(tmp_path / "annotations_instance.zip", "w") as dst,
    ):
        for name in src.namelist()[1:]:
            dst.writestr(name, src.read(name))
        dropped = src.namelist()[0]
    split = "train" if "/training/" in dropped else "val"
    with pytest.raises(ValueError, match=r"1 instance PNGs missing from .*annotations_instance\.zip"):
        ADE20KPanoptic(tmp_path, split)


def test_panoptic_sample_has_no_crowd_and_contiguous_ids(root):
    sample = ADE20KPanoptic(root, "val")[1]
    assert sample["labels"].dtype == torch.int64 and sample["labels"].max() < 150
    assert not sample["is_crowd"].any()
    assert sorted(s["id"] for s in sample["panoptic"]["segments"]) == sorted(
        set(sample["panoptic"]["id_map"].unique().tolist()) - {0}
    )


def _encode(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_single_valued_label_pngs_are_left_out_of_training_and_the_answer_is_cached(
    root, tmp_path, monkeypatch
):
    monkeypatch.setenv("EOMT_CACHE", str(tmp_path / "cache"))
    shutil.copytree(root, tmp_path / "ade20k")
    archive = tmp_path / "ade20k" / "ADEChallengeData2016.zip"
    member = "ADEChallengeData2016/annotations/training/ADE_train_00000002.png"
    with zipfile.ZipFile(archive) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(archive, "w") as z:
        for info, data in members:  # one label PNG of a single value (a class, not "other")
            z.writestr(info, _encode(np.full(SIZE, 7)) if info.filename == member else data)

    train = ADE20KSemantic(tmp_path / "ade20k", "train", skip_empty=True)
    assert len(train) == 4 and "ADE_train_00000002" not in [train.records[i]["image_id"] for i in range(4)]
    assert len(ADE20KSemantic(tmp_path / "ade20k", "train")) == 5
    assert len(list((tmp_path / "cache" / "empty_targets").glob("ade20k_semantic-*.json"))) == 1
    monkeypatch.setattr("eomt.data.ade20k.single_valued", lambda png: pytest.fail("decoded again"))
    assert len(ADE20KSemantic(tmp_path / "ade20k", "train", skip_empty=True)) == 4


def test_panoptic_emptiness_follows_the_release():
    wall, person = 1, 13  # "wall" is stuff; semantic value 13 is the instance class "person"
    assert person - 1 in THING_CLASSES and wall - 1 not in THING_CLASSES
    no_instance = _encode(np.zeros((4, 4, 3)))
    assert panoptic_pngs_empty(_encode(np.full((4, 4), wall)), no_instance)  # a single value, even stuff
    things_only = _encode([[0, person], [person, person]])
    assert panoptic_pngs_empty(things_only, no_instance)
    assert not panoptic_pngs_empty(_encode([[0, wall], [person, person]]), no_instance)
    one_instance = np.zeros((2, 2, 3))
    one_instance[..., 1] = 1  # G = instance id 1 over the whole image
    assert not panoptic_pngs_empty(things_only, _encode(one_instance))
    varying = np.zeros((2, 2, 3))
    varying[0, 0] = (4, 1, 0)
    assert not panoptic_pngs_empty(things_only, _encode(varying))
