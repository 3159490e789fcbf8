"""Inference geometry (letterbox round trip, sliding windows) and the predictors on a stand-in network."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from eomt.data.collate import collate_eval
from eomt.inference import InstancePredictor, PanopticPredictor, SemanticPredictor
from eomt.inference.resize import (
    cover,
    fit_inside,
    letterbox,
    merge_windows,
    sliding_windows,
    unletterbox,
    window_starts,
)


def test_fit_inside_and_cover_sizes():
    assert fit_inside((480, 640), (640, 640)) == (480, 640)
    assert fit_inside((1000, 500), (640, 640)) == (640, 320)
    assert fit_inside((100, 50), (640, 640)) == (640, 320)  # small images are enlarged
    assert cover((512, 683), (512, 512)) == (512, 683)
    assert cover((1024, 2048), (512, 512)) == (512, 1024)
    assert cover((300, 200), (512, 512)) == (768, 512)


@pytest.mark.parametrize("window", [7, 16, 512])
def test_window_starts_cover_the_length_with_evenly_split_overlap(window):
    for length in range(window, 4 * window + 3):
        starts = window_starts(length, window)
        assert len(starts) == math.ceil(length / window)
        assert starts[0] == 0 and starts[-1] + window == length
        steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        assert all(0 < s <= window for s in steps)
        assert not steps or max(steps) - min(steps) <= 1
    assert window_starts(683, 512) == [0, 171]  # an ADE20K image at 512


def pil_resized(image: torch.Tensor, size) -> torch.Tensor:
    """The release's resize, from PIL's documented API: Image.resize((w, h), Image.BILINEAR) on uint8."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)


def random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random content, so resizing moves pixel values by more than rounding."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, h // 4 + 2, w // 4 + 2), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    noise = torch.rand((3, h, w), generator=g) * 0.2
    return ((smooth * 0.8 + noise) * 255).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("size", [(30, 50), (64, 20), (100, 37), (13, 71), (40, 40)])
@pytest.mark.parametrize("crop", [(40, 40), (32, 48)])
def test_letterbox_equals_the_pil_reference_pixel_for_pixel(size, crop):
    image = random_image(*size, seed=size[0])
    factor = min(crop[0] / size[0], crop[1] / size[1])  # the longer side fits, as the release
    h, w = round(size[0] * factor), round(size[1] * factor)
    expected = torch.zeros((3, *crop), dtype=torch.uint8)  # zero padding bottom/right
    expected[:, :h, :w] = pil_resized(image, (h, w))
    box = letterbox(image, crop)
    assert box.crops.dtype == torch.uint8 and box.crops.shape == (1, 3, *crop)
    assert torch.equal(box.crops[0], expected)
    assert box.resized_size == (h, w) and box.orig_size == size


def release_window_starts(length: int, window: int) -> list[int]:
    """The release's float form: n windows, overlap split evenly, int() of each start."""
    n = math.ceil(length / window)
    overlap = n * window - length
    per = overlap / (n - 1) if overlap > 0 else 0
    return [int(j * (window - per)) for j in range(n)]


@pytest.mark.parametrize(
    "size, num_windows",
    [((50, 50), 1), ((45, 70), 2), ((30, 75), 3), ((27, 100), 4), ((90, 30), 3), ((61, 33), 2)],
)
def test_sliding_windows_equal_the_pil_reference_pixel_for_pixel(size, num_windows):
    crop = (32, 32)
    image = random_image(*size, seed=size[1])
    factor = max(crop[0] / size[0], crop[1] / size[1])  # the shorter side to the crop, as the release
    scaled = (round(size[0] * factor), round(size[1] * factor))
    reference = pil_resized(image, scaled)
    long_axis = 1 if scaled[1] >= scaled[0] else 0
    starts = release_window_starts(scaled[long_axis], crop[0])
    assert len(starts) == num_windows
    expected = [
        reference[:, :, s : s + 32] if long_axis == 1 else reference[:, s : s + 32, :] for s in starts
    ]
    windows = sliding_windows(image, crop)
    assert windows.crops.dtype == torch.uint8 and windows.resized_size == scaled
    assert torch.equal(windows.crops, torch.stack(expected))


def test_letterbox_round_trip_returns_the_image_and_no_padding():
    images = [
        torch.full((3, 30, 50), 200, dtype=torch.uint8),
        torch.full((3, 64, 20), 100, dtype=torch.uint8),
    ]
    boxes = [letterbox(image, (40, 40)) for image in images]
    assert boxes[0].resized_size == (24, 40) and boxes[1].resized_size == (40, 12)
    assert (boxes[0].crops[0, :, 24:] == 0).all() and (boxes[1].crops[0, :, :, 12:] == 0).all()
    for image, box in zip(images, boxes, strict=True):
        back = unletterbox(box.crops[0].float() / 255, box)
        assert back.shape == (3, *image.shape[-2:])
        assert torch.allclose(back, image.float() / 255, atol=1e-6)  # no padding bleeds in at the border


def test_letterbox_round_trip_of_a_smooth_image_at_a_quarter_resolution():
    h, w = 45, 70
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    image = (torch.stack([ys, xs, (ys + xs) / 2]) * 255).round().to(torch.uint8)
    box = letterbox(image, (64, 64))
    quarter = F.avg_pool2d(box.crops.float() / 255, 4)[0]  # what a network at 1/4 resolution sees
    back = unletterbox(quarter, box)
    inner = (slice(None), slice(4, -4), slice(4, -4))  # the last quarter-pixel row touches the padding
    assert (back[inner] - image[inner].float() / 255).abs().max() < 0.03


def test_sliding_windows_cover_the_image_and_merging_averages_overlaps():
    image = (
        torch.arange(16 * 37, dtype=torch.float32)
        .reshape(1, 16, 37)
        .expand(3, -1, -1)
        .remainder(256)
        .to(torch.uint8)
    )
    windows = sliding_windows(image, (16, 16))
    assert [left for _, left in windows.origins] == [0, 10, 21] and windows.crops.shape == (3, 3, 16, 16)
    # the windows hold the image itself (its shorter side already equals the crop)
    for (_, left), crop in zip(windows.origins, windows.crops, strict=True):
        assert torch.equal(crop, image[:, :, left : left + 16])
    merged = merge_windows(windows.crops.float() / 255, windows)
    assert torch.allclose(merged, image.float() / 255, atol=1e-6)
    # window k scores k everywhere: overlaps read the mean of the windows covering them
    scores = torch.arange(3.0)[:, None, None, None].expand(3, 1, 16, 16)
    row = merge_windows(scores, windows)[0, 0]
    assert row[:10].eq(0).all() and row[10:16].eq(0.5).all() and row[16:21].eq(1).all()
    assert row[21:26].eq(1.5).all() and row[26:].eq(2).all()


def test_sliding_windows_of_a_large_image_are_scaled_then_resized_back():
    image = torch.zeros((3, 64, 160), dtype=torch.uint8)
    image[:, :, 80:] = 255
    windows = sliding_windows(image, (32, 32))
    assert windows.resized_size == (32, 80) and len(windows.origins) == 3
    merged = merge_windows(windows.crops.float() / 255, windows)
    assert merged.shape == (3, 64, 160)
    assert merged[:, :, :70].max() < 0.05 and merged[:, :, 90:].min() > 0.95


# ---------------------------------------------------------------------------------------------
# Predictors on a deterministic stand-in network


class StandInEoMT(nn.Module):
    """Follows the EoMT contract. Query q in 0..2 covers where colour channel q is bright and
    predicts class q; query 3 is "no object". With `num_points` > 1 it returns that many
    prediction points (as masked attention does), each identical."""

    def __init__(self, img_size=(32, 32), num_points: int = 1):
        super().__init__()
        self.img_size = img_size
        self.num_classes = 3
        self.num_points = num_points
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, images):
        feats = F.avg_pool2d(images, 4)
        masks = torch.cat([(feats - 0.5) * self.scale, torch.full_like(feats[:, :1], -20.0)], 1)
        classes = torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 9.0, 0], [0, 0, 0, 9.0]])
        classes = classes.expand(images.shape[0], -1, -1)
        return [masks] * self.num_points, [classes] * self.num_points


def halves(h, w, left_channel, right_channel):
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    image[left_channel, :, : w // 2] = 255
    image[right_channel, :, w // 2 :] = 255
    return image


def test_panoptic_predictor_finds_the_painted_segments_at_the_original_size():
    images = [halves(40, 24, 0, 1), halves(20, 60, 2, 0)]
    predictions = PanopticPredictor(thing_classes=[0])(StandInEoMT(), images)
    first, second = predictions
    assert first["id_map"].shape == (40, 24) and second["id_map"].shape == (20, 60)
    by_id = {s["id"]: s["category_id"] for s in first["segments"]}
    assert sorted(by_id.values()) == [0, 1]
    left, right = first["id_map"][:, :10], first["id_map"][:, 14:]
    assert (left == left[0, 0]).all() and by_id[int(left[0, 0])] == 0
    assert (right == right[0, 0]).all() and by_id[int(right[0, 0])] == 1
    assert {s["category_id"] for s in second["segments"]} == {2, 0}


def test_panoptic_predictor_with_no_confident_query_predicts_all_void():
    # an untrained network: every query's best class is "no object"
    model = StandInEoMT()
    model.forward = lambda images: (
        [torch.zeros(images.shape[0], 4, 8, 8)],
        [torch.tensor([0.0, 0, 0, 9.0]).expand(images.shape[0], 4, 4)],
    )
    (prediction,) = PanopticPredictor(thing_classes=[0])(model, [halves(30, 20, 0, 1)])
    assert prediction["segments"] == []
    assert prediction["id_map"].shape == (30, 20) and (prediction["id_map"] == 0).all()


def test_instance_predictor_ranks_the_painted_instance_first():
    image = halves(36, 48, 0, 1)
    (prediction,) = InstancePredictor(topk=5)(StandInEoMT(), [image])
    assert prediction["masks"].shape == (5, 36, 48) and prediction["masks"].dtype == torch.bool
    best = prediction["scores"].argmax()
    assert prediction["labels"][best] in (0, 1) and prediction["scores"][best] > 0.9
    painted = prediction["masks"][best]
    expected = torch.zeros(36, 48, dtype=torch.bool)
    expected[:, :24] = prediction["labels"][best] == 0
    expected[:, 24:] = prediction["labels"][best] == 1
    assert (painted == expected).float().mean() > 0.95


def test_semantic_predictor_labels_each_half():
    images = [halves(24, 56, 0, 2), halves(50, 16, 1, 0)]
    first, second = SemanticPredictor()(StandInEoMT(img_size=(16, 16)), images)
    assert first["semantic"].shape == (24, 56) and second["semantic"].shape == (50, 16)
    assert (first["semantic"][:, :24] == 0).all() and (first["semantic"][:, 32:] == 2).all()
    assert (second["semantic"][:, :6] == 1).all() and (second["semantic"][:, 10:] == 0).all()


def test_per_block_predictions_need_intermediate_outputs():
    images = [halves(32, 32, 0, 1)]
    per_point = PanopticPredictor(thing_classes=[0]).predict(
        StandInEoMT(num_points=3), images, all_blocks=True
    )
    assert len(per_point) == 3 and all(len(p) == 1 for p in per_point)
    with pytest.raises(ValueError, match="masked_attn"):
        SemanticPredictor().predict(StandInEoMT(img_size=(16, 16)), images, all_blocks=True)


def test_semantic_predictor_in_steps_matches_one_pass():
    images = [halves(24, 56, 0, 2)]
    model = StandInEoMT(img_size=(16, 16))
    one = SemanticPredictor()(model, images)[0]["semantic"]
    stepped = SemanticPredictor(windows_per_step=1)(model, images)[0]["semantic"]
    assert torch.equal(one, stepped)


class Recorder(StandInEoMT):
    """The stand-in network, keeping the batches it was given."""

    def __init__(self, img_size):
        super().__init__(img_size=img_size)
        self.batches = []

    def forward(self, images):
        self.batches.append(images.clone())
        return super().forward(images)


@pytest.mark.parametrize("predictor", [PanopticPredictor(thing_classes=[0]), SemanticPredictor()])
def test_the_network_sees_the_pil_pixels_whether_prepared_by_the_loader_or_not(predictor):
    samples = [{"image": random_image(45, 70, seed=1)}, {"image": random_image(90, 30, seed=2)}]
    crop = (32, 32)
    model = Recorder(crop)
    raw = predictor(model, [s["image"] for s in samples])
    # as eomt.validation builds its loader: the inputs are made in a worker process
    collate = partial(collate_eval, prepare=partial(predictor.prepare, crop=crop))
    (batch,) = DataLoader(samples, batch_size=2, collate_fn=collate, num_workers=1)
    prepared = predictor(model, [s["input"] for s in batch])
    expected = torch.cat([predictor.prepare(s["image"], crop).crops for s in samples]).float() / 255
    assert torch.equal(model.batches[0], expected) and torch.equal(model.batches[1], expected)
    for a, b in zip(raw, prepared, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert all(torch.equal(s["image"], b["image"]) for s, b in zip(samples, batch, strict=True))


def test_inputs_prepared_at_another_crop_are_refused():
    inputs = [letterbox(halves(32, 32, 0, 1), (48, 48))]
    with pytest.raises(ValueError, match="img_size"):
        PanopticPredictor(thing_classes=[0])(StandInEoMT(img_size=(32, 32)), inputs)


class AutocastRecorder(StandInEoMT):
    """The stand-in network, keeping the CPU autocast dtype of each call (None: no autocast)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def forward(self, images):
        on = torch.is_autocast_enabled("cpu")
        self.dtypes.append(torch.get_autocast_dtype("cpu") if on else None)
        return super().forward(images)


@pytest.mark.parametrize("make", [PanopticPredictor, InstancePredictor, SemanticPredictor])
def test_cpu_precision_bf16_runs_the_network_in_bf16_autocast_on_the_cpu(make):
    kwargs = {"thing_classes": [0]} if make is PanopticPredictor else {}
    model = AutocastRecorder()
    images = [halves(32, 32, 0, 1)]
    fp32 = make(**kwargs)(model, images)
    bf16 = make(**kwargs, cpu_precision="bf16", precision="fp16")(model, images)  # precision: CUDA only
    assert model.dtypes == [None, torch.bfloat16]
    for a, b in zip(fp32, bf16, strict=True):  # the stand-in's clear-cut maps are the same at bf16
        assert all(torch.equal(a[k], b[k]) for k in a if k in ("id_map", "semantic", "masks", "labels"))
    with pytest.raises(ValueError, match="cpu_precision=fp16 is not one of fp32|bf16"):
        make(**kwargs, cpu_precision="fp16")
