"""Overlays a person can read: labelled panels, class labels legible on small images, names from data."""

import numpy as np
import torch
from PIL import Image

from eomt.visualize import MIN_SIDE, TITLE_HEIGHT, OverlayCollector, overlay_prediction, upscale_factor


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
