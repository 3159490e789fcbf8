"""The training augmentation: alignment of image and masks, crowd/empty handling, determinism,
and equality with the release's augmentation written from torchvision's v2 transforms."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors

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


def test_mask_gather_equals_torchvision_mask_resize_then_crop():
    torch.manual_seed(0)
    masks = torch.rand(3, 37, 53) > 0.5
    sizes = [
        (74, 106, 10, 20),
        (19, 27, 0, 0),
        (50, 60, 30, 40),
        (37, 53, 5, 5),
        (45, 61, 7, 3),
        (11, 70, 0, 9),
    ]
    for new_h, new_w, top, left in sizes:
        # the release resizes masks in ScaleJitter: torchvision's resize of a Mask (torch's legacy nearest)
        resized = TF.resize(tv_tensors.Mask(masks), [new_h, new_w])
        expected = resized[:, top : top + 16, left : left + 16]
        rows = _source_indices(top, 16, new_h, 37)
        cols = _source_indices(left, 16, new_w, 53)
        assert torch.equal(masks[:, rows][:, :, cols], expected.as_subclass(torch.Tensor))


def test_brightness_is_multiplicative_within_32_over_255():
    ramp = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, -1, -1).contiguous()
    fired = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = ColorJitter().brightness(ramp)
        torch.manual_seed(seed)
        if not torch.rand(()) < 0.5:  # fires with probability 0.5
            assert torch.equal(out, ramp)
            continue
        fired += 1
        factor = torch.empty(1).uniform_(1 - 32 / 255, 1 + 32 / 255)
        # torchvision's adjust_brightness on uint8: multiply by the factor, saturate, truncate
        expected = (ramp * factor).clamp(0, 255).to(torch.uint8)
        assert torch.equal(out, expected) and out[:, 0, 0].eq(0).all()  # black stays black
    assert 10 < fired < 30


def release_color_jitter(image: torch.Tensor) -> torch.Tensor:
    """The release's jitter from its documented behaviour: brightness, then contrast before or after
    (saturation, hue) with probability 0.5; each op with probability 0.5; torchvision functional ops."""

    def factor(delta: float, center: float = 1.0) -> float:
        return torch.empty(1).uniform_(center - delta, center + delta).item()

    def contrast(img):
        return TF.adjust_contrast(img, factor(0.5)) if torch.rand(()) < 0.5 else img

    def saturation_and_hue(img):
        if torch.rand(()) < 0.5:
            img = TF.adjust_saturation(img, factor(0.5))
        if torch.rand(()) < 0.5:
            img = TF.adjust_hue(img, factor(18 / 360, center=0.0))
        return img

    if torch.rand(()) < 0.5:
        image = TF.adjust_brightness(image, factor(32 / 255))
    if torch.rand(()) < 0.5:
        return saturation_and_hue(contrast(image))
    return contrast(saturation_and_hue(image))


def test_color_jitter_equals_the_release_draw_for_draw():
    image = quadrants(24, 30)["image"]
    image[:, ::3] //= 2  # more than four colours
    outputs = set()
    for seed in range(48):
        torch.manual_seed(seed)
        expected = release_color_jitter(image)
        torch.manual_seed(seed)
        assert torch.equal(ColorJitter()(image), expected), f"seed {seed}"
        outputs.add(expected.numpy().tobytes())
    assert len(outputs) > 30


def release_transform(image, masks, labels, is_crowd, crop, scale_range, color_jitter):
    """The release's training transform from torchvision's v2 transforms (drop crowds, jitter,
    flip, ScaleJitter, pad bottom/right, RandomCrop, drop empty masks, draw again)."""
    keep = ~is_crowd
    for _ in range(100):
        img = tv_tensors.Image(image)
        target = {"masks": tv_tensors.Mask(masks[keep]), "labels": labels[keep]}
        if color_jitter:
            img = tv_tensors.wrap(release_color_jitter(img.as_subclass(torch.Tensor)), like=img)
        img, target = T.RandomHorizontalFlip()(img, target)
        img, target = T.ScaleJitter(target_size=crop, scale_range=scale_range)(img, target)
        padding = [0, 0, max(0, crop[1] - img.shape[-1]), max(0, crop[0] - img.shape[-2])]
        img, target["masks"] = TF.pad(img, padding), TF.pad(target["masks"], padding)
        img, target = T.RandomCrop(crop)(img, target)
        valid = target["masks"].flatten(1).any(1)
        if valid.any():
            return img.as_subclass(torch.Tensor), target["masks"][valid].as_subclass(torch.Tensor)
    raise AssertionError("no mask survived")


@pytest.mark.parametrize("color_jitter", [False, True])
def test_transform_equals_the_release_draw_for_draw(color_jitter):
    sample = quadrants(45, 70)
    sample["image"][:, 10:30, 5:40] = torch.arange(35, dtype=torch.uint8) * 7  # detail to resize
    sample["masks"][2] |= torch.rand(45, 70, generator=torch.Generator().manual_seed(0)) > 0.9  # ragged edges
    crop, scale_range = (32, 32), (0.1, 2.0)
    transform = TrainTransform(crop_size=crop, scale_range=scale_range, color_jitter=color_jitter)
    for seed in range(24):
        torch.manual_seed(seed)
        image, masks = release_transform(
            sample["image"],
            sample["masks"],
            sample["labels"],
            sample["is_crowd"],
            crop,
            scale_range,
            color_jitter,
        )
        torch.manual_seed(seed)
        out = transform(sample)
        assert torch.equal(out["image"], image), f"seed {seed}"
        assert torch.equal(out["masks"], masks), f"seed {seed}"


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
