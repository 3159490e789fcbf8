"""Post-processing on constructed logits: known segments, instances and class scores come out."""

from __future__ import annotations

import pytest
import torch

from eomt.inference.postprocess import (
    instance_masks,
    instance_masks_letterboxed,
    instance_topk,
    panoptic_keep,
    panoptic_segments,
    semantic_scores,
    thing_mask,
)
from eomt.inference.resize import letterbox, unletterbox

BIG = 20.0
NUM_CLASSES = 3  # 0 thing, 1 stuff, 2 stuff; index 3 = no object
IS_THING = thing_mask(NUM_CLASSES, [0])


def class_logits_for(labels_and_probs):
    """Class logits whose softmax has roughly `prob` on `label` (label 3 = no object)."""
    rows = []
    for label, prob in labels_and_probs:
        rest = (1 - prob) / NUM_CLASSES
        row = torch.full((NUM_CLASSES + 1,), rest).log()
        row[label] = torch.tensor(prob).log()
        rows.append(row)
    return torch.stack(rows)


def region(h, w, y0, y1, x0, x1):
    m = torch.full((h, w), -BIG)
    m[y0:y1, x0:x1] = BIG
    return m


def panoptic(mask_logits, class_logits, score_threshold=0.8, overlap_threshold=0.8):
    kept, scores, labels = panoptic_keep(class_logits, score_threshold)
    return panoptic_segments(mask_logits[kept], scores, labels, IS_THING, overlap_threshold)


def test_panoptic_known_segments_with_stuff_merged():
    h, w = 8, 8
    masks = torch.stack(
        [
            region(h, w, 0, 8, 0, 4),  # thing, left half
            region(h, w, 0, 4, 4, 8),  # stuff 1, top right
            region(h, w, 4, 8, 4, 8),  # stuff 1 again, bottom right -> merged with the previous
            region(h, w, 0, 8, 0, 8),  # "no object": ignored whatever its mask
            region(h, w, 0, 8, 0, 8),  # class 2 but score 0.5 < 0.8: ignored
        ]
    )
    classes = class_logits_for([(0, 0.95), (1, 0.9), (1, 0.85), (3, 0.99), (2, 0.5)])
    id_map, segments = panoptic(masks, classes)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in segments] == [(1, 0, True), (2, 1, False)]
    assert (id_map[:, :4] == 1).all() and (id_map[:, 4:] == 2).all()
    assert id_map.dtype == torch.int32
    assert segments[0]["score"] == pytest.approx(0.95, abs=1e-4)


def test_two_things_of_one_class_stay_separate():
    masks = torch.stack([region(4, 8, 0, 4, 0, 4), region(4, 8, 0, 4, 4, 8)])
    id_map, segments = panoptic(masks, class_logits_for([(0, 0.9), (0, 0.9)]))
    assert len(segments) == 2 and set(id_map.unique().tolist()) == {1, 2}


def test_query_mostly_covered_by_a_stronger_one_is_dropped_and_its_pixels_stay_void():
    h, w = 4, 10
    strong = region(h, w, 0, 4, 0, 7)  # wins columns 0..6
    weak = region(h, w, 0, 4, 0, 10)  # its own mask is 40 px, it wins 12 (< 0.8 x 40): dropped
    id_map, segments = panoptic(torch.stack([strong, weak]), class_logits_for([(0, 0.99), (2, 0.85)]))
    assert len(segments) == 1 and segments[0]["category_id"] == 0
    assert (id_map[:, :7] == 1).all() and (id_map[:, 7:] == 0).all()  # the dropped query's pixels: void
    # with a lower overlap threshold the weak query keeps what it won
    id_map, segments = panoptic(
        torch.stack([strong, weak]), class_logits_for([(0, 0.99), (2, 0.85)]), overlap_threshold=0.2
    )
    assert len(segments) == 2 and (id_map[:, 7:] == 2).all()


def test_pixels_where_the_winner_is_below_one_half_are_void():
    masks = torch.stack([region(2, 4, 0, 2, 0, 2)])
    id_map, segments = panoptic(masks, class_logits_for([(0, 0.9)]))
    assert id_map.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]] and len(segments) == 1


def test_nothing_kept_gives_an_all_void_map():
    masks = torch.stack([region(3, 3, 0, 3, 0, 3)])
    id_map, segments = panoptic(masks, class_logits_for([(3, 0.99)]))
    assert segments == [] and id_map.shape == (3, 3) and (id_map == 0).all()


def test_instance_topk_over_query_and_class_pairs():
    classes = torch.tensor([[4.0, 1.0, 0.0, 0.0], [0.0, 3.0, 2.5, 0.0]])  # 2 queries, 3 classes + no object
    queries, labels, probs = instance_topk(classes, topk=3)
    order = probs.argsort(descending=True)
    pairs = list(zip(queries[order].tolist(), labels[order].tolist(), strict=True))
    assert pairs == [(0, 0), (1, 1), (1, 2)]
    expected = classes.softmax(-1)
    assert probs[order].tolist() == pytest.approx(
        [expected[0, 0].item(), expected[1, 1].item(), expected[1, 2].item()]
    )
    assert len(instance_topk(classes, topk=100)[0]) == 6  # at most Q x C


def test_instance_score_is_class_prob_times_mean_mask_prob_inside():
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    masks, scores = instance_masks(logits, torch.tensor([0.5, 0.9]))
    assert masks[0].tolist() == [[True, False], [True, False]]
    inside_mean = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(0.5))) / 2
    assert scores[0].item() == pytest.approx(0.5 * inside_mean.item(), rel=1e-5)
    assert scores[1].item() == pytest.approx(0.0, abs=1e-6)  # empty mask


def test_semantic_scores_sum_sigmoid_masks_times_class_probs():
    torch.manual_seed(0)
    masks, classes = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 4)
    scores = semantic_scores(masks, classes)
    expected = torch.zeros(2, 3, 3, 4)
    for b in range(2):
        for q in range(5):
            expected[b] += classes[b, q].softmax(-1)[:3, None, None] * masks[b, q].sigmoid()
    assert scores.shape == (2, 3, 3, 4) and torch.allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("orig", [(96, 128), (128, 85), (128, 128), (70, 100)])
def test_instance_masks_upsampled_around_positive_logits_equal_the_dense_path(orig):
    """Blob-shaped logits: some touch the borders, some lie in the letterbox padding, some are
    never positive, queries repeat (two classes of one query); (70, 100) is resized, dense."""
    generator = torch.Generator().manual_seed(sum(orig))
    num_queries, crop = 24, (128, 128)
    box = letterbox(torch.zeros((3, *orig), dtype=torch.uint8), crop)
    h, w = crop[0] // 4, crop[1] // 4
    ys, xs = torch.arange(h).float()[:, None], torch.arange(w).float()[None]
    centres = torch.rand(num_queries, 2, generator=generator) * torch.tensor([h + 6.0, w + 6.0]) - 3
    radius = 1 + 6 * torch.rand(num_queries, 1, 1, generator=generator)
    distance = (ys - centres[:, :1, None]) ** 2 + (xs - centres[:, 1:, None]) ** 2
    logits = 4 * (1 - distance / radius**2) + 0.5 * torch.randn(num_queries, h, w, generator=generator)
    logits[3] = -1.0  # never positive
    queries = torch.tensor(
        [0, 1, 2, 3, 4, 5, 1, 6, 7, 8, 9, 0, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 23]
    )
    probs = torch.rand(len(queries), generator=generator)

    masks, scores, boxes = instance_masks_letterboxed(logits, queries, probs, box)
    dense_masks, dense_scores = instance_masks(unletterbox(logits[queries], box), probs)
    assert masks.shape == (len(queries), *orig) and masks.any()
    assert torch.equal(masks, dense_masks)
    torch.testing.assert_close(scores, dense_scores, rtol=1e-6, atol=0)
    if boxes is None:  # resized: the dense path
        assert orig == (70, 100)
    else:  # every True pixel lies in its box
        for mask, (top, bottom, left, right) in zip(masks, boxes.tolist(), strict=True):
            assert mask.sum() == mask[top:bottom, left:right].sum()
    assert (
        scores[3] == 0
        and torch.equal(masks[6], masks[1])
        and scores[6] == pytest.approx(float(scores[1] / probs[1] * probs[6]))
    )
