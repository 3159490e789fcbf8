"""The training augmentation: alignment of image and masks, crowd/empty handling, determinism."""

import pytest
import torch
import torch.nn.functional as F

from eomt.data.transforms import ColorJitter, TrainTransform, _source_indices

COLORS = torch.tensor([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], dtype=torch.uint8)


def quadrants(height=40, width=60) -> dict:
    """An image of four coloured quadrants, each one mask, plus a crowd mask over the top-left one."""
    masks = torch.zeros(5, height, width, dtype=torch.bool)
    masks[0, : height // 2, : width // 2] = True
    masks[1, : height // 2, width // 2 :] = True
    masks[2, height // 2 :, : width // 2] = True
    masks[3, height // 2 :, width // 2 :] = True
    masks[4, 2:6, 2:6] = True
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for color, mask in zip(COLORS, masks[:4], strict=True):
        image[:, mask] = color[:, None]
    return {
        "image": image,
        "masks": masks,
        "labels": torch.tensor([0, 1, 2, 3, 0]),
        "is_crowd": torch.tensor([False, False, False, False, True]),
        "skipped": 2,
        "panoptic": {"id_map": torch.zeros(height, width)},
        "image_id": 7,
    }


def _eroded(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood lies inside the mask (away from interpolated borders)."""
    return -F.max_pool2d(-mask[None].float(), 3, stride=1, padding=1)[0] > 0.5


@pytest.mark.parametrize("seed", range(12))
def test_image_and_masks_stay_aligned(seed):
    torch.manual_seed(seed)
    out = TrainTransform(crop_size=(32, 48), scale_range=(0.3, 2.0))(quadrants())
    assert out["image"].shape == (3, 32, 48) and out["image"].dtype == torch.uint8
    assert out["masks"].shape[1:] == (32, 48) and out["masks"].dtype == torch.bool
    assert set(out) == {"image", "masks", "labels", "is_crowd", "skipped"}
    assert 0 < len(out["labels"]) <= 4 and not out["is_crowd"].any()
    assert out["skipped"] == 2
    for mask, label in zip(out["masks"], out["labels"], strict=True):
        assert mask.any()
        inner = _eroded(mask)
        pixels = out["image"][:, inner].T
        assert (pixels == COLORS[label]).all(), "a mask moved away from its image region"
    covered = out["masks"].any(0)
    assert (out["image"][:, ~covered] == 0).all()  # every image pixel is in a mask; the rest is black padding


def test_flip_swaps_left_and_right():
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = TrainTransform(crop_size=(40, 60), scale_range=(1.0, 1.0))(quadrants())  # no scaling, no crop
        assert torch.equal(out["labels"].sort().values, torch.tensor([0, 1, 2, 3]))
        red = out["masks"][out["labels"] == 0][0]
        flips.add(bool(red[0, -1]))  # red (top-left) now at the top right?
        assert red[0, -1] != red[0, 0]
    assert flips == {True, False}


def test_crowd_and_empty_masks_are_dropped():
    sample = quadrants()
    sample["masks"] = torch.cat([sample["masks"], torch.zeros(1, 40, 60, dtype=torch.bool)])
    sample["labels"] = torch.cat([sample["labels"], torch.tensor([3])])
    sample["is_crowd"] = torch.cat([sample["is_crowd"], torch.tensor([False])])
    torch.manual_seed(0)
    out = TrainTransform(crop_size=(40, 60), scale_range=(1.0, 1.0))(sample)
    assert sorted(out["labels"].tolist()) == [0, 1, 2, 3]
    assert len(out["masks"]) == 4


def test_nothing_left_draws_again():
    sample = quadrants(64, 64)
    sample["masks"] = torch.zeros(1, 64, 64, dtype=torch.bool)
    sample["masks"][0, 60:, 60:] = True  # a tiny corner that most crops miss
    sample["labels"], sample["is_crowd"] = torch.tensor([2]), torch.tensor([False])
    transform = TrainTransform(crop_size=(16, 16), scale_range=(1.0, 1.0))
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(sample)
        assert len(out["masks"]) == 1 and out["masks"][0].any()


def test_sample_without_targets_still_gives_a_crop():
    sample = quadrants()
    sample["masks"], sample["labels"] = sample["masks"][4:], sample["labels"][4:]
    sample["is_crowd"] = sample["is_crowd"][4:]  # only a crowd region, which is dropped
    torch.manual_seed(0)
    out = TrainTransform(crop_size=(32, 32), scale_range=(0.5, 2.0))(sample)
    assert out["image"].shape == (3, 32, 32) and out["masks"].shape == (0, 32, 32) and len(out["labels"]) == 0


def test_same_seed_same_output():
    transform = TrainTransform(crop_size=(32, 32), scale_range=(0.1, 2.0), color_jitter=True)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(transform(quadrants()))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    assert torch.equal(outputs[0]["masks"], outputs[1]["masks"])
    assert not (
        torch.equal(outputs[0]["image"], outputs[2]["image"])
        and torch.equal(outputs[0]["masks"], outputs[2]["masks"])
    )


def test_mask_gather_equals_resize_then_crop():
    torch.manual_seed(0)
    masks = torch.rand(3, 37, 53) > 0.5
    for new_h, new_w, top, left in [(74, 106, 10, 20), (19, 27, 0, 0), (50, 60, 30, 40), (37, 53, 5, 5)]:
        resized = F.interpolate(masks[None].float(), size=(new_h, new_w), mode="nearest-exact")[0].bool()
        expected = resized[:, top : top + 16, left : left + 16]
        rows = _source_indices(top, 16, new_h, 37)
        cols = _source_indices(left, 16, new_w, 53)
        assert torch.equal(masks[:, rows][:, :, cols], expected)


def test_color_jitter_changes_colours_within_range():
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    image[0] = 200
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = ColorJitter()(image)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        changed += int(not torch.equal(out, image))
    assert changed >= 8  # each of four operations fires with probability 0.5


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(32,), scale_range=(0.5, 2.0))
