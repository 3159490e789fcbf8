"""Our PQ and mIoU (panopticapi's conventions) against the release's torchmetrics conventions.

The release's conventions are re-implemented here from their documented behaviour
(docs/differences.md, Metrics), pixel by pixel and slowly, to show where the two disagree:
- PQ and mIoU are averaged over every class, a class absent from ground truth and prediction
  counting 0 (ours and panopticapi's: over the classes present);
- its targets are listed in ascending segment id and a segment's crowd flag is looked up by its
  instance id, which torchmetrics sets to 0 for stuff: every stuff segment takes the crowd flag
  of the image's lowest-id segment.
"""

from collections import Counter

import numpy as np

from eomt.metrics.panoptic import pq_image_stats, summarize_pq
from eomt.metrics.semantic import semantic_metrics

IS_THING = np.array([True, True, True, True, False, False, False, False])  # 4 things, 4 stuff
NUM_CLASSES = len(IS_THING)
VOID = (-1, -1)


def _colours(categories: np.ndarray, instances: np.ndarray, is_thing: np.ndarray) -> list[tuple[int, int]]:
    out = []
    for c, i in zip(categories.ravel().tolist(), instances.ravel().tolist(), strict=True):
        out.append(VOID if c < 0 else (c, i if is_thing[c] else 0))  # torchmetrics zeroes stuff instances
    return out


def release_pq_stats(gt_map, gt_segments, pred_map, pred_segments) -> np.ndarray:
    """(TP, FP, FN, IoU sum) per class as the release's panoptic validation counts them."""
    is_thing = np.append(
        IS_THING, False
    )  # its "no object" pixels form an extra stuff class, dropped at the end
    targets = sorted(gt_segments, key=lambda s: s["id"])  # target.unique(): ascending ids
    crowd = [bool(s["iscrowd"]) for s in targets]
    gt_cat, gt_inst = np.full(gt_map.shape, -1), np.full(gt_map.shape, -1)
    for index, s in enumerate(targets):
        gt_cat[gt_map == s["id"]], gt_inst[gt_map == s["id"]] = s["category_id"], index
    pred_cat, pred_inst = np.full(pred_map.shape, NUM_CLASSES), np.zeros(pred_map.shape, dtype=int)
    for s in pred_segments:
        pred_cat[pred_map == s["id"]], pred_inst[pred_map == s["id"]] = s["category_id"], s["id"]
    gt, pred = _colours(gt_cat, gt_inst, is_thing), _colours(pred_cat, pred_inst, is_thing)
    gt_area, pred_area, inter = Counter(gt), Counter(pred), Counter(zip(pred, gt, strict=True))

    stats = np.zeros((4, NUM_CLASSES + 1))
    matched_pred, matched_gt = set(), set()
    for (p, g), n in inter.items():
        if g == VOID or crowd[g[1]] or p[0] != g[0]:
            continue
        iou = n / (pred_area[p] + gt_area[g] - n - inter.get((p, VOID), 0))
        if iou > 0.5:
            matched_pred.add(p), matched_gt.add(g)
            stats[0, g[0]] += 1
            stats[3, g[0]] += iou
    crowd_of = {}
    for g in sorted(set(gt_area) - matched_gt - {VOID}):
        if crowd[g[1]]:
            crowd_of[g[0]] = g[1]
        else:
            stats[2, g[0]] += 1
    for p in set(pred_area) - matched_pred:
        ignored = inter.get((p, VOID), 0)
        if p[0] in crowd_of:
            ignored += inter.get((p, (p[0], crowd_of[p[0]])), 0)
        if ignored / pred_area[p] <= 0.5:
            stats[1, p[0]] += 1
    return stats[:, :NUM_CLASSES]


def release_pq(stats: np.ndarray) -> float:
    """torchmetrics' per-class PQ (0 where a class has no TP, FP or FN), averaged over every class."""
    tp, fp, fn, iou = stats
    denominator = tp + 0.5 * fp + 0.5 * fn
    return float(np.divide(iou, denominator, out=np.zeros_like(iou), where=denominator > 0).mean())


def release_miou(confusion: np.ndarray) -> float:
    """MulticlassJaccardIndex(average=None) (0 for an absent class), then the mean over every class."""
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.divide(tp, union, out=np.zeros_like(tp), where=union > 0).mean())


def generated_image(rng: np.random.Generator, size: int = 32, crowd: bool = False):
    """Two stuff regions, three thing boxes (one a crowd region if asked), a void border; random ids as
    COCO's colours give; a prediction with shifted boxes, a dropped box and a moved stuff boundary."""
    stuff = rng.choice(np.flatnonzero(~IS_THING)[:3], 2, replace=False)  # the 4th stuff class never occurs
    things = rng.choice(np.flatnonzero(IS_THING)[:3], 3)  # nor does the 4th thing class
    ids = iter(rng.choice(np.arange(1, 10_000), 10, replace=False).tolist())

    def draw(split: int, boxes, kept) -> tuple[np.ndarray, list[dict]]:
        segment_map, segments = np.zeros((size, size), dtype=np.int64), []
        for category, rows in zip(stuff, (slice(0, split), slice(split, size)), strict=True):
            segments.append({"id": next(ids), "category_id": int(category), "iscrowd": 0})
            segment_map[rows] = segments[-1]["id"]
        for k, (category, (y, x, h, w)) in enumerate(zip(things, boxes, strict=True)):
            if kept[k]:
                segments.append(
                    {"id": next(ids), "category_id": int(category), "iscrowd": int(crowd and k == 0)}
                )
                segment_map[y : y + h, x : x + w] = segments[-1]["id"]
        return segment_map, segments

    boxes = [(*rng.integers(2, size - 12, 2), *rng.integers(6, 10, 2)) for _ in range(3)]
    gt_map, gt_segments = draw(size // 2, boxes, [True] * 3)
    gt_map[:, :1] = 0  # void
    shifted = [(y + rng.integers(-2, 3), x + rng.integers(-2, 3), h, w) for y, x, h, w in boxes]
    pred_map, pred_segments = draw(size // 2 + int(rng.integers(-6, 7)), shifted, rng.random(3) > 0.2)
    pred_segments = [s for s in pred_segments if (pred_map == s["id"]).any()]
    for s in gt_segments:
        s["area"] = int((gt_map == s["id"]).sum())
    return gt_map, gt_segments, pred_map, pred_segments


def lowest_id_is_crowd(segments) -> bool:
    return bool(min(segments, key=lambda s: s["id"])["iscrowd"])


def test_release_counts_equal_ours_unless_the_lowest_segment_is_crowd():
    rng = np.random.default_rng(0)
    differed = 0
    for n in range(60):
        gt_map, gt_segments, pred_map, pred_segments = image = generated_image(rng, crowd=n % 2 == 0)
        ours = pq_image_stats(gt_map, gt_segments, pred_map, pred_segments, NUM_CLASSES)
        theirs = release_pq_stats(*image)
        if lowest_id_is_crowd(gt_segments):
            differed += not np.allclose(ours, theirs)
        else:
            np.testing.assert_allclose(theirs, ours, err_msg=f"image {n}")
    assert differed > 0


def test_release_loses_the_stuff_of_an_image_whose_lowest_segment_is_crowd():
    sky, person = 4, 0
    gt_map = np.full((8, 8), 20)
    gt_map[2:5, 2:5] = 10  # the crowd region has the lowest id
    gt_segments = [
        {"id": 10, "category_id": person, "iscrowd": 1, "area": 9},
        {"id": 20, "category_id": sky, "iscrowd": 0, "area": 55},
    ]
    pred_map = np.where(gt_map == 20, 7, 0)  # the sky, exactly; nothing on the crowd
    pred_segments = [{"id": 7, "category_id": sky}]
    ours = pq_image_stats(gt_map, gt_segments, pred_map, pred_segments, NUM_CLASSES)
    theirs = release_pq_stats(gt_map, gt_segments, pred_map, pred_segments)
    assert ours[:, sky].tolist() == [1, 0, 0, 1.0]  # TP with IoU 1
    assert theirs[:, sky].tolist() == [0, 0, 0, 0.0]  # read as crowd: neither matched nor missed
    pred_segments = []  # and a missed sky is no false negative there
    theirs = release_pq_stats(gt_map, gt_segments, np.zeros_like(gt_map), pred_segments)
    assert (
        theirs[2, sky] == 0
        and pq_image_stats(gt_map, gt_segments, np.zeros_like(gt_map), [], NUM_CLASSES)[2, sky] == 1
    )


def test_averaging_over_every_class_scales_by_the_share_of_classes_present():
    rng = np.random.default_rng(1)
    images = [generated_image(rng) for _ in range(20)]  # no crowd: the counts agree, only the mean differs
    stats = sum(pq_image_stats(*image[:4], NUM_CLASSES) for image in images)
    ours = summarize_pq(stats, IS_THING)["All"]
    assert ours["n"] < NUM_CLASSES
    assert np.isclose(release_pq(stats), ours["pq"] * ours["n"] / NUM_CLASSES)

    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for gt_map, gt_segments, pred_map, pred_segments in images:
        to_class = np.vectorize({s["id"]: s["category_id"] for s in gt_segments + pred_segments}.get)
        valid = gt_map > 0  # the prediction covers every pixel
        np.add.at(confusion, (to_class(gt_map[valid]), to_class(pred_map[valid])), 1)
    ours_miou = semantic_metrics(confusion)
    assert ours_miou["num_classes_counted"] < NUM_CLASSES
    assert np.isclose(
        release_miou(confusion), ours_miou["miou"] * ours_miou["num_classes_counted"] / NUM_CLASSES
    )
