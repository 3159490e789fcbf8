"""Users' own panoptic data (COCO panoptic format) from folders or zips."""

import io
import json
import zipfile

import pytest
import torch

from eomt.data import CocoPanoptic, CustomPanoptic
from eomt.data.synthetic import generate


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return generate("coco", tmp_path_factory.mktemp("coco"), num_train=3, num_val=2, size=(32, 40), seed=5)


def _export(coco, out, images_as_zip: bool, masks_as_zip: bool):
    """Re-pack the generated COCO val split as a user would lay out their own data."""
    with zipfile.ZipFile(coco / "panoptic_annotations_trainval2017.zip") as z:
        annotations = z.read("annotations/panoptic_val2017.json")
        pngs = zipfile.ZipFile(io.BytesIO(z.read("annotations/panoptic_val2017.zip")))
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / "panoptic_val.json").write_bytes(annotations)
    with zipfile.ZipFile(coco / "val2017.zip") as z:
        jpgs = {n.split("/")[-1]: z.read(n) for n in z.namelist()}
    if images_as_zip:  # files at the top of the zip
        with zipfile.ZipFile(out / "images_val.zip", "w") as z:
            for name, data in jpgs.items():
                z.writestr(name, data)
    else:
        (out / "images" / "val").mkdir(parents=True)
        for name, data in jpgs.items():
            (out / "images" / "val" / name).write_bytes(data)
    if masks_as_zip:  # files under one folder, as COCO ships them
        with zipfile.ZipFile(out / "annotations" / "panoptic_val.zip", "w") as z:
            for name in pngs.namelist():
                z.writestr(name, pngs.read(name))
    else:
        (out / "annotations" / "panoptic_val").mkdir()
        for name in pngs.namelist():
            (out / "annotations" / "panoptic_val" / name.split("/")[-1]).write_bytes(pngs.read(name))
    return out


@pytest.mark.parametrize(("images_as_zip", "masks_as_zip"), [(False, False), (True, True)])
def test_custom_reads_the_same_samples_as_coco(coco, tmp_path, images_as_zip, masks_as_zip):
    root = _export(coco, tmp_path / "mine", images_as_zip, masks_as_zip)
    dataset = CustomPanoptic(
        root,
        "val",
        images="images_{split}.zip" if images_as_zip else "images/{split}",
        masks="annotations/panoptic_{split}.zip" if masks_as_zip else "annotations/panoptic_{split}",
        class_names=["disc", "box", "triangle", "sky", "ground"],
    )
    reference = CocoPanoptic(coco, "val")
    assert len(dataset) == len(reference) == 2
    assert dataset.thing_classes == [0, 1, 2]
    for index in range(2):
        ours, theirs = dataset[index], reference[index]
        for key in ("image", "masks", "labels", "is_crowd"):
            assert torch.equal(ours[key], theirs[key])
        assert ours["panoptic"]["segments"] == theirs["panoptic"]["segments"]


def test_custom_errors_name_what_is_missing(coco, tmp_path):
    root = _export(coco, tmp_path / "mine", False, False)
    with pytest.raises(
        FileNotFoundError,
        match=r"expected .*annotations/panoptic_train\.json \(see conf/dataset/custom\.yaml",
    ):
        CustomPanoptic(root, "train")
    with pytest.raises(ValueError, match="differ from the configured class_names"):
        CustomPanoptic(root, "val", class_names=["cat", "dog"])
    data = json.loads((root / "annotations" / "panoptic_val.json").read_text())
    data["annotations"][0]["image_id"] = 424242
    (root / "annotations" / "panoptic_val.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotated image ids missing from the 'images' list .*424242"):
        CustomPanoptic(root, "val")
