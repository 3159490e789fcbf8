"""PQ: hand-made cases with known answers, and agreement with panopticapi on generated cases."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eomt.data.decode import png_ids, rgb_to_id
from eomt.metrics.panoptic import (
    PanopticEvaluator,
    _index_of,
    id_to_rgb,
    pq_compute,
    pq_image_stats,
    summarize_pq,
)

THING, STUFF, OTHER = 0, 1, 2
IS_THING = [True, False, True]


def seg(id_, cat, area=None, crowd=0):
    return {"id": id_, "category_id": cat, "iscrowd": crowd, "area": area}


def with_areas(id_map, segments):
    return [
        {**s, "area": s["area"] if s["area"] is not None else int((id_map == s["id"]).sum())}
        for s in segments
    ]


def pq_of(gt_map, gt_segs, pred_map, pred_segs, num_categories=3):
    gt_map, pred_map = np.array(gt_map), np.array(pred_map)
    stats = pq_image_stats(gt_map, with_areas(gt_map, gt_segs), pred_map, pred_segs, num_categories)
    return stats, summarize_pq(stats, IS_THING[:num_categories])


def test_perfect_prediction_scores_one():
    gt = [[1, 1, 2, 2], [1, 1, 2, 2]]
    stats, r = pq_of(gt, [seg(1, THING), seg(2, STUFF)], gt, [seg(1, THING), seg(2, STUFF)])
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert r["Things"]["n"] == 1 and r["Stuff"]["n"] == 1
    assert stats[0].tolist() == [1, 1, 0]  # TP per category


def test_iou_must_exceed_one_half_strictly():
    gt = [[1, 1, 1, 1, 0, 0]]
    # IoU = 2/4: not a match -> one FN and one FP
    stats, r = pq_of(gt, [seg(1, THING)], [[5, 5, 0, 0, 0, 0]], [seg(5, THING)])
    assert stats[:3, THING].tolist() == [0, 1, 1] and r["All"]["pq"] == 0.0
    # IoU = 3/4: a match, PQ = SQ = 0.75
    stats, r = pq_of(gt, [seg(1, THING)], [[5, 5, 5, 0, 0, 0]], [seg(5, THING)])
    assert stats[:3, THING].tolist() == [1, 0, 0]
    assert r["All"]["pq"] == pytest.approx(0.75) and r["All"]["rq"] == 1.0


def test_prediction_pixels_on_void_do_not_count_in_the_union():
    gt = [[1, 1, 0, 0, 0]]
    stats, r = pq_of(gt, [seg(1, THING)], [[7, 7, 7, 7, 0]], [seg(7, THING)])
    assert stats[:, THING].tolist() == [1, 0, 0, 1.0]  # IoU = 2 / (4 + 2 - 2 - 2) = 1


def test_ground_truth_area_comes_from_the_annotation():
    gt = [[1, 1, 1, 1]]
    # JSON says 6 pixels (e.g. the PNG was cropped): IoU = 4 / (4 + 6 - 4) = 2/3
    _, r = pq_of(gt, [seg(1, THING, area=6)], [[3, 3, 3, 3]], [seg(3, THING)])
    assert r["All"]["pq"] == pytest.approx(2 / 3)


def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive():
    gt = [[1, 1, 1, 1, 0, 0, 0]]
    # wrong class; 3 of its 5 pixels on void -> ignored; the ground truth is a FN
    stats, r = pq_of(gt, [seg(1, THING)], [[0, 0, 4, 4, 4, 4, 4]], [seg(4, OTHER)])
    assert stats[:3].sum(1).tolist() == [0, 0, 1]
    assert r["All"]["n"] == 1 and r["per_class"][OTHER] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    # 2 of 5 on void -> a false positive of OTHER, which now counts in the mean
    stats, r = pq_of(gt, [seg(1, THING)], [[0, 4, 4, 4, 4, 4, 0]], [seg(4, OTHER)])
    assert stats[1, OTHER] == 1 and r["All"]["n"] == 2  # row 1 = FP


def test_crowd_region_is_neither_matched_nor_missed_and_excuses_same_class_predictions():
    gt = [[9, 9, 9, 9, 1, 1]]
    gt_segs = [seg(9, THING, crowd=1), seg(1, STUFF)]
    # A THING prediction covering the crowd: would have IoU 1 but crowd never matches; mostly on
    # the crowd of its own class -> not a false positive. The crowd is not a false negative.
    stats, r = pq_of(gt, gt_segs, [[5, 5, 5, 5, 2, 2]], [seg(5, THING), seg(2, STUFF)])
    assert stats[:3, THING].tolist() == [0, 0, 0]
    assert r["All"]["n"] == 1 and r["All"]["pq"] == 1.0  # THING has no TP/FP/FN: left out
    # The same pixels predicted as OTHER: the crowd of THING does not excuse it -> FP
    stats, _ = pq_of(gt, gt_segs, [[5, 5, 5, 5, 2, 2]], [seg(5, OTHER), seg(2, STUFF)])
    assert stats[1, OTHER] == 1


def test_class_absent_from_ground_truth_counts_as_zero():
    gt = [[1, 1, 2, 2]]
    _, r = pq_of(gt, [seg(1, THING), seg(2, STUFF)], [[1, 1, 3, 3]], [seg(1, THING), seg(3, OTHER)])
    # THING: 1; STUFF: FN -> 0; OTHER: FP -> 0
    assert r["All"]["pq"] == pytest.approx(1 / 3) and r["All"]["n"] == 3
    assert r["Things"]["pq"] == pytest.approx(0.5) and r["Stuff"]["pq"] == 0.0


def test_stuff_split_into_two_segments_scores_below_merged_stuff():
    gt = [[1, 1, 1, 1, 1, 1, 1, 1]]
    merged = pq_of(gt, [seg(1, STUFF)], [[4, 4, 4, 4, 4, 4, 4, 0]], [seg(4, STUFF)])[1]
    split = pq_of(gt, [seg(1, STUFF)], [[4, 4, 4, 4, 4, 5, 5, 0]], [seg(4, STUFF), seg(5, STUFF)])
    assert merged["All"]["pq"] == pytest.approx(7 / 8)
    # the larger part still matches (IoU 5/8); the rest is a false positive
    assert split[0][:3, STUFF].tolist() == [1, 1, 0]
    assert split[1]["All"]["pq"] == pytest.approx((5 / 8) / 1.5)


def test_bad_predictions_raise_one_line_errors():
    gt = np.array([[1, 1]])
    gt_segs = with_areas(gt, [seg(1, THING)])
    with pytest.raises(ValueError, match="not in its segments_info"):
        pq_image_stats(gt, gt_segs, np.array([[1, 2]]), [seg(1, THING)], 3)
    with pytest.raises(ValueError, match="no pixels"):
        pq_image_stats(gt, gt_segs, np.array([[1, 1]]), [seg(1, THING), seg(2, THING)], 3)
    with pytest.raises(ValueError, match="contiguous"):
        pq_image_stats(gt, gt_segs, np.array([[1, 1]]), [seg(1, 7)], 3)


# ---------------------------------------------------------------------------------------------
# Generated cases: files on disk, scored by panopticapi, by our pq_compute and by the evaluator


def random_case(rng: np.random.Generator, num_categories: int, h: int = 24, w: int = 32):
    """A ground truth and a noisy prediction derived from it, as id maps + segment lists."""
    gt = np.zeros((h, w), dtype=np.int64)
    gt_cats = {}
    for _ in range(rng.integers(3, 9)):
        id_ = int(rng.integers(1, 2**24))
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        gt[y : y + rng.integers(2, h // 2), x : x + rng.integers(2, w // 2)] = id_
        gt_cats[id_] = int(rng.integers(num_categories))
    gt_segments = []
    for id_ in np.unique(gt[gt > 0]).tolist():
        area = int((gt == id_).sum()) + int(rng.integers(0, 3) if rng.random() < 0.2 else 0)
        gt_segments.append(
            {"id": id_, "category_id": gt_cats[id_], "iscrowd": int(rng.random() < 0.2), "area": area}
        )

    pred = gt.copy()
    for s in gt_segments:
        roll = rng.random()
        if roll < 0.2:
            pred[pred == s["id"]] = 0
        elif roll < 0.4:
            pred = np.where(gt == s["id"], np.roll(pred, rng.integers(-3, 4), axis=1), pred)
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        pred[y : y + rng.integers(2, 10), x : x + rng.integers(2, 10)] = int(rng.integers(1, 2**24))
    pred_segments, relabelled = [], np.zeros_like(pred)
    for new_id, old_id in enumerate(np.unique(pred[pred > 0]).tolist(), start=1):
        relabelled[pred == old_id] = new_id * 997
        cat = gt_cats.get(old_id, int(rng.integers(num_categories)))
        if rng.random() < 0.15:
            cat = int(rng.integers(num_categories))
        pred_segments.append({"id": new_id * 997, "category_id": cat})
    return gt, gt_segments, relabelled, pred_segments


def write_coco_panoptic(folder: Path, name: str, maps, segments, categories, category_ids):
    (folder / name).mkdir(parents=True)
    annotations = []
    for image_id, (id_map, segs) in enumerate(zip(maps, segments, strict=True)):
        file_name = f"{image_id:04d}.png"
        Image.fromarray(id_to_rgb(id_map)).save(folder / name / file_name)
        segs = [{**s, "category_id": category_ids[s["category_id"]]} for s in segs]
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segs})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": categories}))
    return path


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 123456]])
    assert (rgb_to_id(id_to_rgb(ids)) == ids).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_panopticapi_and_with_the_evaluator(tmp_path, seed):
    from panopticapi.evaluation import pq_compute as reference_pq_compute

    rng = np.random.default_rng(seed)
    num_categories = 5
    category_ids = [3, 17, 18, 40, 92]  # non-contiguous, as in COCO
    categories = [{"id": c, "name": f"c{c}", "isthing": int(i < 3)} for i, c in enumerate(category_ids)]
    cases = [random_case(rng, num_categories) for _ in range(12)]
    gt_json = write_coco_panoptic(
        tmp_path, "gt", [c[0] for c in cases], [c[1] for c in cases], categories, category_ids
    )
    pred_json = write_coco_panoptic(
        tmp_path, "pred", [c[2] for c in cases], [c[3] for c in cases], categories, category_ids
    )

    with contextlib.redirect_stdout(io.StringIO()):
        expected = reference_pq_compute(str(gt_json), str(pred_json))
    ours = pq_compute(gt_json, pred_json, num_workers=1)
    ours_parallel = pq_compute(gt_json, pred_json, num_workers=2)
    backends = [ours, ours_parallel]
    if importlib.util.find_spec("hotcoco"):  # the optional extra eomt[metrics]; make test installs it
        backends.append(pq_compute(gt_json, pred_json, backend="hotcoco"))

    evaluator = PanopticEvaluator(num_classes=num_categories, thing_classes=[0, 1, 2])
    for image_id, (gt, gt_segs, pred, pred_segs) in enumerate(cases):
        sample = {"image_id": image_id, "panoptic": {"id_map": gt.astype(np.int32), "segments": gt_segs}}
        evaluator.update([{"id_map": pred, "segments": pred_segs}], [sample])
    from_evaluator = evaluator.compute()

    for group in ("All", "Things", "Stuff"):
        assert expected[group]["n"] > 0
        for result in (*backends, from_evaluator):
            assert result[group]["n"] == expected[group]["n"]
            for key in ("pq", "sq", "rq"):
                assert result[group][key] == pytest.approx(expected[group][key], abs=1e-12)
    for i, category_id in enumerate(category_ids):
        for key in ("pq", "sq", "rq"):
            for result in backends:
                assert result["per_class"][category_id][key] == pytest.approx(
                    expected["per_class"][category_id][key]
                )
            assert from_evaluator["per_class"][i][key] == pytest.approx(
                expected["per_class"][category_id][key]
            )


def test_evaluator_counts_an_image_seen_twice_once():
    gt = np.array([[1, 1, 2, 2]], dtype=np.int32)
    sample = {
        "image_id": 7,
        "panoptic": {"id_map": gt, "segments": with_areas(gt, [seg(1, THING), seg(2, STUFF)])},
    }
    prediction = {"id_map": np.array([[1, 1, 1, 2]]), "segments": [seg(1, THING), seg(2, STUFF)]}
    evaluator = PanopticEvaluator(num_classes=3, thing_classes=[0, 2])
    evaluator.update([prediction], [sample])
    once = evaluator.compute()
    evaluator.update([prediction], [sample])
    assert evaluator.compute() == once and once["num_images"] == 1
    evaluator.reset()
    evaluator.update([prediction], [{**sample, "image_id": 8}])
    assert evaluator.compute()["num_images"] == 1


@pytest.mark.parametrize(
    "ids",
    [
        np.arange(1, 40),  # our predictions: small ids, a direct table
        np.random.default_rng(0).choice(2**24, 60, replace=False),  # PNG ids: a hash of the low bits
        np.arange(1, 300) << 16,  # low 16 bits all zero: a hash of the shifted bits
        np.arange(70_000) * 211 + 5,  # too many ids for a 16-bit table: binary search
    ],
    ids=["small", "png", "high-bits", "many"],
)
def test_segment_lookup_finds_listed_ids_and_only_them(ids):
    rng = np.random.default_rng(1)
    unlisted = np.setdiff1d(rng.integers(0, 2**24, 500), ids)
    values = np.concatenate([rng.choice(ids, 3000), unlisted, ids[:5]])
    rng.shuffle(values)
    position = {int(v): i for i, v in enumerate(ids)}
    expected = [position.get(int(v), -7) for v in values]
    assert _index_of(values.astype(np.int32), ids, absent=-7).tolist() == expected


def test_png_ids_read_the_rgb_bytes_as_ids(tmp_path):
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 123456]])
    Image.fromarray(id_to_rgb(ids)).save(tmp_path / "ids.png")
    with Image.open(tmp_path / "ids.png") as image:
        assert png_ids(image).tolist() == ids.tolist()
        assert png_ids(image.convert("RGBA")).tolist() == ids.tolist()  # other modes: through RGB
