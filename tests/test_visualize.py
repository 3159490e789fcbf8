"""Overlays a person can read: labelled panels, class labels legible on small images, names from data."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from eomt.visualize import (
    MIN_SIDE,
    TITLE_HEIGHT,
    OverlayCollector,
    class_colors,
    layout_labels,
    overlay_prediction,
    upscale_factor,
)


def _semantic_pair(size=48):
    image = torch.full((3, size, size), 128, dtype=torch.uint8)
    semantic = torch.zeros(size, size, dtype=torch.int64)
    semantic[:, size // 2 :] = 1
    return image, {"semantic": semantic}, {"semantic": semantic.clone()}


def test_small_images_are_drawn_enlarged_under_titled_panels(tmp_path):
    image, prediction, sample = _semantic_pair(48)
    overlay = overlay_prediction("semantic", image, prediction, sample, ["sky", "ground"])
    f = upscale_factor(48, 48)
    assert f == -(-MIN_SIDE // 48) and overlay.shape == (3, TITLE_HEIGHT + 48 * f, 2 * 48 * f + 4)
    band = overlay[:, :TITLE_HEIGHT]
    left, right = band[:, :, : 48 * f], band[:, :, 48 * f + 4 :]
    assert (left < 100).any() and (right < 100).any()  # "prediction" | "ground truth" written
    assert not np.array_equal(left, right)  # two different titles
    Image.fromarray(overlay.transpose(1, 2, 0)).save(tmp_path / "overlay.png")  # viewable as is
    assert upscale_factor(512, 700) == 1


def test_collector_without_configured_names_labels_with_the_datas_or_ids():
    image, prediction, sample = _semantic_pair(32)
    sample.update(image=image, image_id=7)
    for names in (None, ["sky", "ground"]):
        collector = OverlayCollector("semantic", names, max_images=1)
        collector([prediction], [sample])
        assert [i for i, _ in collector.overlays] == [7]
    assert OverlayCollector("semantic", None, max_images=0).overlays == []


def _shapes_scene(size=64):
    """A background segment whose centre lies on two objects in the middle, and a 2x2 speck: the
    layout the demo's overlays lost labels in (the background's label covered the objects')."""
    id_map = torch.ones(size, size, dtype=torch.int32)
    id_map[24:40, 20:34] = 2  # box
    for row in range(24, 40):  # triangle
        id_map[row, 36 : 36 + (row - 23)] = 3
    id_map[4:6, 4:6] = 4  # speck
    segments = [
        {"id": 1, "category_id": 0, "isthing": False},
        {"id": 2, "category_id": 1},
        {"id": 3, "category_id": 2},
        {"id": 4, "category_id": 3, "isthing": False},
    ]
    return torch.full((3, size, size), 128, dtype=torch.uint8), id_map, segments


def test_every_segment_is_labelled_on_itself_or_listed_in_the_legend():
    image, id_map, segments = _shapes_scene()
    names = ["background", "box", "triangle", "speck"]
    f = upscale_factor(64, 64)
    regions = [
        (np.kron((id_map == s["id"]).numpy(), np.ones((f, f))).astype(bool), np.zeros(3), names[i])
        for i, s in enumerate(segments)
    ]
    draw = ImageDraw.Draw(Image.new("RGB", (64 * f, 64 * f)))
    placed, unlabelled = layout_labels(regions, draw, ImageFont.load_default())
    assert sorted([p[3] for p in placed] + [t for _, t in unlabelled]) == sorted(names)  # each once
    assert [t for _, t in unlabelled] == ["speck"]  # 2x2 pixels: no room
    boxes = {text: (x, y, x + w, y + h) for x, y, (w, h), text, *_ in placed}
    for text, (x0, y0, x1, y1) in boxes.items():
        mask = regions[names.index(text)][0]
        assert mask[y0:y1, x0:x1].mean() >= 0.5, text  # at least half of the label on its segment
        for other, (a0, b0, a1, b1) in boxes.items():
            assert other == text or min(x1, a1) <= max(x0, a0) or min(y1, b1) <= max(y0, b0), (text, other)


def test_the_legend_names_what_is_too_small_to_label(tmp_path):
    image, id_map, segments = _shapes_scene()
    names = ["background", "box", "triangle", "speck"]
    picture = overlay_prediction(
        "panoptic",
        image,
        {"id_map": id_map, "segments": segments},
        {"panoptic": {"id_map": id_map, "segments": segments}},
        names,
    )
    f = upscale_factor(64, 64)
    assert picture.shape[1] > TITLE_HEIGHT + 64 * f  # a legend band under both panels
    legend = picture[:, TITLE_HEIGHT + 64 * f :, : 64 * f]
    speck_colour = class_colors(4)[3]
    swatch = (legend == speck_colour[:, None, None]).all(axis=0)
    assert swatch.sum() >= 50  # the speck's colour, in the legend
    Image.fromarray(picture.transpose(1, 2, 0)).save(tmp_path / "legend.png")
    without_speck = [s for s in segments if s["id"] != 4]
    plain = overlay_prediction("panoptic", image, {"id_map": id_map, "segments": without_speck}, None, names)
    assert plain.shape[1] == 64 * f  # everything labelled: no legend
