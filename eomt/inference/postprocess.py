"""Turn one image's mask and class logits into a panoptic map, instances or a semantic map.

All three are vectorised tensor code on the logits' device. Python loops over queries: panoptic's
walk over the kept ones (tens) to number segments and merge stuff, which touches no pixel, and,
on the CPU, instance masks upsampled one query at a time around its positive logits
(`instance_masks_letterboxed`: a small box each instead of every pixel of the image).
Inputs are float32 logits; class logits have C+1 entries, the last is "no object".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eomt.inference.resize import NetworkInput, unletterbox


def panoptic_keep(
    class_logits: torch.Tensor, score_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries whose top class is a real class with probability > `score_threshold`.

    Returns (indices, scores, labels) of the kept queries; lets callers upsample only their masks.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.float().softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > score_threshold)
    indices = keep.nonzero().squeeze(1)
    return indices, scores[indices], labels[indices]


def panoptic_segments(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    is_thing: torch.Tensor,
    overlap_threshold: float = 0.8,
) -> tuple[torch.Tensor, list[dict]]:
    """Mask2Former's panoptic rule on the kept queries (in their order).

    mask_logits (K,H,W), scores (K,), labels (K,) of kept queries; is_thing: bool (C,).
    Each pixel goes to the query with the largest score x sigmoid(mask) and is kept where that
    query's own mask >= 0.5. A query is dropped when it wins no such pixel or when the pixels it
    wins are fewer than `overlap_threshold` of its mask >= 0.5 area. Stuff queries of one class
    share the segment of the first one. Returns an int32 id map (0 = void, segments from 1) and
    `[{"id", "category_id", "isthing", "score"}]`.
    """
    height, width = mask_logits.shape[-2:]
    device = mask_logits.device
    num_queries = mask_logits.shape[0]
    if num_queries == 0:
        return torch.zeros((height, width), dtype=torch.int32, device=device), []
    probs = mask_logits.float().sigmoid()
    winner = (scores[:, None, None] * probs).argmax(0)  # (H,W)
    own_mask = probs >= 0.5
    winner_on_own_mask = own_mask.gather(0, winner[None])[0]

    won_area = torch.bincount(winner.flatten(), minlength=num_queries)
    mask_area = own_mask.flatten(1).sum(1)
    final_area = torch.bincount(
        torch.where(winner_on_own_mask, winner, num_queries).flatten(), minlength=num_queries + 1
    )[:-1]
    kept = (mask_area > 0) & (won_area > 0) & (final_area > 0)
    # the ratio in float64, as Mask2Former's Python division computes it
    kept &= won_area.double() / mask_area.clamp(min=1).double() >= overlap_threshold

    segment_of_query = [0] * num_queries
    segments: list[dict] = []
    stuff_segment: dict[int, int] = {}
    thing_flags = is_thing[labels].tolist()
    for k, (keep, label, score, thing) in enumerate(
        zip(kept.tolist(), labels.tolist(), scores.tolist(), thing_flags, strict=True)
    ):
        if not keep:
            continue
        if not thing and label in stuff_segment:
            segment_of_query[k] = stuff_segment[label]
            continue
        segments.append(
            {"id": len(segments) + 1, "category_id": label, "isthing": bool(thing), "score": score}
        )
        segment_of_query[k] = len(segments)
        if not thing:
            stuff_segment[label] = len(segments)
    lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=device)
    id_map = torch.where(winner_on_own_mask, lookup[winner], 0).to(torch.int32)
    return id_map, segments


def instance_topk(
    class_logits: torch.Tensor, topk: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top `topk` (query, class) pairs by class probability, "no object" excluded.

    Returns (query indices, labels, class probabilities), each (k,), k = min(topk, Q*C).
    """
    probs = class_logits.float().softmax(-1)[:, :-1]
    num_classes = probs.shape[1]
    top_probs, flat = probs.flatten().topk(min(topk, probs.numel()), sorted=False)
    return flat // num_classes, flat % num_classes, top_probs


def instance_masks(mask_logits: torch.Tensor, class_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks (logit > 0) and scores = class probability x mean sigmoid inside the mask."""
    masks = mask_logits > 0
    probs = mask_logits.float().sigmoid()
    inside = masks.flatten(1)
    mask_scores = (probs.flatten(1) * inside).sum(1) / (inside.sum(1) + 1e-6)
    return masks, class_probs * mask_scores


def instance_masks_letterboxed(
    mask_logits: torch.Tensor, queries: torch.Tensor, class_probs: torch.Tensor, box: NetworkInput
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`instance_masks(unletterbox(mask_logits[queries], box), class_probs)`, computing only what matters.

    mask_logits (Q,h,w) of one letterboxed image at the network's resolution (crop / 4); queries,
    class_probs (K,) from `instance_topk`. A bilinear pixel is a convex combination of its
    sources, so it can be > 0 only next to a source > 0: each query is upsampled only over the
    box around its positive logits, with a margin. `F.interpolate` on that cut-out computes the
    very values it computes on the whole map (the scale stays (b - a) / 4 (b - a) = 1/4), except
    in the 2 rows / columns at a cut edge, which are dropped. Everything else is False without
    being computed, and a query listed twice (two classes) is upsampled once. Masks equal the
    dense path's exactly; scores add the same float32 values in another order (~1e-7 relative).
    Needs the letterbox's second resize to be the identity (the image fits the crop without
    scaling, as COCO at 640); otherwise, and off the CPU (where one batched interpolate beats a
    hundred small ones), this is the dense path. Returns (masks, scores, boxes): boxes int64 (K,4)
    (top, bottom, left, right, ends exclusive) hold every True pixel of each mask (RLE encoding
    reads only them); None from the dense path.
    """
    height, width = box.orig_size
    h, w = mask_logits.shape[-2:]
    exact = tuple(box.crop) == (4 * h, 4 * w) and tuple(box.resized_size) == (height, width)
    if not exact or mask_logits.device.type != "cpu":
        return (*instance_masks(unletterbox(mask_logits[queries].float(), box), class_probs), None)
    num = len(queries)
    masks = torch.zeros((num, height, width), dtype=torch.bool, device=mask_logits.device)
    mask_scores = torch.zeros(num, dtype=torch.float32, device=mask_logits.device)
    box_list = [[0, 0, 0, 0]] * num
    unique, inverse = torch.unique(queries, return_inverse=True)
    order = torch.arange(num, device=queries.device)
    first_row = torch.full((len(unique),), num, device=queries.device).scatter_reduce(
        0, inverse, order, "amin"
    )
    positive = mask_logits[unique] > 0  # (U,h,w)
    rows, cols = positive.any(2), positive.any(1)
    has_any = rows.any(1)
    # first / last positive row and column of each query at low resolution
    bounds = torch.stack(
        [
            rows.int().argmax(1),
            h - 1 - rows.flip(1).int().argmax(1),
            cols.int().argmax(1),
            w - 1 - cols.flip(1).int().argmax(1),
        ],
        1,
    ).tolist()
    for query, k, (r0, r1, c0, c1), found in zip(
        unique.tolist(), first_row.tolist(), bounds, has_any.tolist(), strict=True
    ):
        if not found:
            continue  # nothing > 0 at low resolution: an empty mask, score 0
        a, b, c, d = max(r0 - 2, 0), min(r1 + 3, h), max(c0 - 2, 0), min(c1 + 3, w)
        up = F.interpolate(
            mask_logits[query, a:b, c:d].float()[None, None],
            size=(4 * (b - a), 4 * (d - c)),
            mode="bilinear",
            align_corners=False,
        )[0, 0]
        y0, x0 = (2 if a > 0 else 0), (2 if c > 0 else 0)  # first exact row / column of the cut-out
        y1 = min(4 * (b - a) - (2 if b < h else 0), height - 4 * a)  # ... and past the last one
        x1 = min(4 * (d - c) - (2 if d < w else 0), width - 4 * c)
        if y1 <= y0 or x1 <= x0:
            continue  # the positive logits lie in the letterbox's padding
        region = up[y0:y1, x0:x1]
        inside = region > 0
        masks[k, 4 * a + y0 : 4 * a + y1, 4 * c + x0 : 4 * c + x1] = inside
        box_list[k] = [4 * a + y0, 4 * a + y1, 4 * c + x0, 4 * c + x1]
        mask_scores[k] = (region.sigmoid() * inside).sum() / (inside.sum() + 1e-6)
    source = first_row[inverse]  # a query listed twice (two classes) was upsampled once
    repeated = source != order
    masks[repeated], mask_scores[repeated] = masks[source[repeated]], mask_scores[source[repeated]]
    boxes = torch.tensor(box_list, dtype=torch.int64).reshape(num, 4)
    boxes[repeated] = boxes[source[repeated]]
    return masks, class_probs * mask_scores, boxes


def semantic_scores(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class scores (B,C,H,W) = sum over queries of sigmoid(mask) x softmax(class)[:C]."""
    class_probs = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqhw,bqc->bchw", mask_logits.float().sigmoid(), class_probs)


def thing_mask(
    num_classes: int, thing_classes: Sequence[int], device: torch.device | None = None
) -> torch.Tensor:
    """bool (C,) with True at thing classes."""
    flags = torch.zeros(num_classes, dtype=torch.bool, device=device)
    if len(thing_classes):
        flags[torch.as_tensor(list(thing_classes), device=device)] = True
    return flags
