import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from eomt.training import MaskClassificationLoss

NUM_CLASSES = 4
NUM_POINTS = 48  # 144 candidates, 36 uncertain + 12 uniform points per mask


class RecordingDraw:
    """Uniform random points, remembered so the reference can reuse them."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = []

    def __call__(self, shape, device):
        points = torch.rand(shape, generator=self.generator).to(device)
        self.draws.append(points)
        return points


def sample(image, points):
    """Bilinear value of one (H, W) image at (P, 2) points in [0, 1] -> (P,)."""
    grid = (2 * points - 1).view(1, -1, 1, 2)
    return F.grid_sample(image[None, None], grid, align_corners=False).view(-1)


def dice(logits, targets):
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def reference_loss(
    mask_logits, class_logits, targets, draws, matching_points="per_prediction", divide_by=None
):
    """The release's loss written plainly: one prediction, image and matched pair at a time, taking
    the recorded points in the release's order (per prediction: each image's matching points, then
    candidates and extra points of the matched masks, image after image, queries ascending)."""
    draws = iter(draws)
    num_queries = mask_logits[0].shape[1]
    num_matched = sum(min(len(t["labels"]), num_queries) for t in targets)
    num_masks = max(num_matched if divide_by is None else divide_by, 1)
    class_weights = torch.ones(NUM_CLASSES + 1)
    class_weights[-1] = 0.1
    names = [f"b{i}" for i in range(len(mask_logits) - 1)] + ["final"]

    total, logs = 0.0, {}
    for k, name in enumerate(names):
        if k == 0 or matching_points == "per_prediction":
            match_points = [next(draws)[0] for _ in targets]
        candidates, extra = next(draws), next(draws)
        target_classes, bce_sum, dice_sum, m = [], torch.tensor(0.0), torch.tensor(0.0), 0
        for b, target in enumerate(targets):
            masks, labels = target["masks"].float(), target["labels"]
            logits_b = mask_logits[k][b]
            classes_b = torch.full((logits_b.shape[0],), NUM_CLASSES)
            if len(labels):
                with torch.no_grad():
                    pts = match_points[b]
                    pred = torch.stack([sample(q, pts) for q in logits_b])[:, None]  # (Q, 1, P)
                    tgt = torch.stack([sample(t, pts) for t in masks])[None]  # (1, N, P)
                    pred, tgt = torch.broadcast_tensors(pred, tgt)
                    cost = (
                        2 * -class_logits[k][b].softmax(-1)[:, labels]
                        + 5 * F.binary_cross_entropy_with_logits(pred, tgt, reduction="none").mean(-1)
                        + 5 * dice(pred, tgt)
                    )
                rows, cols = linear_sum_assignment(cost.numpy())  # rows (queries) ascending
                classes_b[rows] = labels[cols]
                for q, j in zip(rows, cols, strict=True):
                    with torch.no_grad():
                        uncertainty = -sample(logits_b[q], candidates[m]).abs()
                        top = uncertainty.topk(int(0.75 * NUM_POINTS)).indices
                        coords = torch.cat([candidates[m][top], extra[m]])
                    point_logits, point_labels = sample(logits_b[q], coords), sample(masks[j], coords)
                    bce_sum = bce_sum + F.binary_cross_entropy_with_logits(point_logits, point_labels)
                    dice_sum = dice_sum + dice(point_logits, point_labels)
                    m += 1
            target_classes.append(classes_b)
        assert m == len(candidates) == len(extra) == num_matched
        ce = F.cross_entropy(class_logits[k].flatten(0, 1), torch.cat(target_classes), weight=class_weights)
        logs[f"class/{name}"] = ce
        logs[f"mask/{name}"] = bce_sum / num_masks
        logs[f"dice/{name}"] = dice_sum / num_masks
        total = total + 2 * ce + 5 * bce_sum / num_masks + 5 * dice_sum / num_masks
    assert next(draws, None) is None  # every recorded draw was used
    return total, logs


def random_batch(counts, num_blocks=3, queries=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask_logits = [
        torch.randn(len(counts), queries, size // 4, size // 4, generator=g) * 3 for _ in range(num_blocks)
    ]
    class_logits = [
        torch.randn(len(counts), queries, NUM_CLASSES + 1, generator=g) for _ in range(num_blocks)
    ]
    targets = [
        {
            "masks": torch.rand(n, size, size, generator=g) > 0.6,
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
        }
        for n in counts
    ]
    return mask_logits, class_logits, targets


def make_loss(draw, **kwargs):
    return MaskClassificationLoss(NUM_CLASSES, num_points=NUM_POINTS, draw_points=draw, **kwargs)


@pytest.mark.parametrize(
    "counts",
    [
        [3, 0, 2],  # an image without targets inside a batch
        [7, 1],  # more targets than the 5 queries: divided by the 6 matched masks
    ],
)
@pytest.mark.parametrize("matching_points", ["per_prediction", "shared"])
def test_loss_equals_per_image_reference(counts, matching_points):
    mask_logits, class_logits, targets = random_batch(counts)
    draw = RecordingDraw()
    total, logs = make_loss(draw, matching_points=matching_points)(mask_logits, class_logits, targets)

    assert sorted(logs) == sorted(
        f"{term}/{name}" for term in ("class", "mask", "dice") for name in ("b0", "b1", "final")
    )
    expected_total, expected_logs = reference_loss(
        mask_logits, class_logits, targets, draw.draws, matching_points
    )
    for key, value in expected_logs.items():
        torch.testing.assert_close(logs[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(total, expected_total, rtol=1e-5, atol=1e-6)


def test_more_segments_than_queries_divides_by_matched_masks_unless_told_targets():
    mask_logits, class_logits, targets = random_batch([9], queries=4)
    _, matched = make_loss(RecordingDraw())(mask_logits, class_logits, targets)
    _, all_targets = make_loss(RecordingDraw(), mask_normalization="targets")(
        mask_logits, class_logits, targets
    )
    for key in ("mask/b0", "dice/final"):
        torch.testing.assert_close(all_targets[key], matched[key] * 4 / 9)
    torch.testing.assert_close(all_targets["class/b1"], matched["class/b1"])


@pytest.mark.parametrize(("matching_points", "same"), [("per_prediction", False), ("shared", True)])
def test_matching_points_are_drawn_per_prediction(matching_points, same):
    mask_logits, class_logits, targets = random_batch([3, 2], num_blocks=2)
    mask_logits[1], class_logits[1] = mask_logits[0], class_logits[0]  # two identical predictions
    loss = make_loss(RecordingDraw(), matching_points=matching_points)
    seen = []
    matcher = loss.matcher

    def spy(pred_at_points, classes, target_at_points, labels, counts):
        seen.append((pred_at_points, target_at_points))
        return matcher(pred_at_points, classes, target_at_points, labels, counts)

    loss.matcher = spy
    loss(mask_logits, class_logits, targets)
    pred_at_points, target_at_points = seen[0]
    assert torch.equal(pred_at_points[0], pred_at_points[1]) == same
    assert torch.equal(target_at_points[0], target_at_points[1]) == same


def test_gradients_reach_every_prediction_and_are_finite():
    mask_logits, class_logits, targets = random_batch([3, 2])
    for tensor in mask_logits + class_logits:
        tensor.requires_grad_(True)
    total, logs = make_loss(RecordingDraw())(mask_logits, class_logits, targets)
    total.backward()
    for tensor in mask_logits + class_logits:
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0
    assert all(not value.requires_grad for value in logs.values())


def test_batch_without_targets_is_all_no_object():
    mask_logits, class_logits, targets = random_batch([0, 0], num_blocks=1)
    mask_logits[0].requires_grad_(True)
    total, logs = make_loss(RecordingDraw())(mask_logits, class_logits, targets)

    assert sorted(logs) == ["class/final", "dice/final", "mask/final"]
    assert logs["mask/final"] == 0 and logs["dice/final"] == 0
    all_no_object = torch.full((2 * 5,), NUM_CLASSES)
    torch.testing.assert_close(
        logs["class/final"], F.cross_entropy(class_logits[0].flatten(0, 1), all_no_object)
    )
    torch.testing.assert_close(total, 2 * logs["class/final"])
    total.backward()
    assert mask_logits[0].grad is not None  # the mask head stays in the graph (DDP needs it)


def test_mask_terms_are_divided_by_the_mask_count_averaged_over_ranks(monkeypatch):
    reduced = []

    def fake_all_reduce(tensor, op=None):  # another rank holds 7 target masks
        reduced.append(float(tensor))
        tensor += 7

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)

    mask_logits, class_logits, targets = random_batch([3, 2])
    draw = RecordingDraw()
    _, logs = make_loss(draw)(mask_logits, class_logits, targets)
    _, local_logs = reference_loss(
        mask_logits, class_logits, targets, draw.draws
    )  # divides by 5 matched masks
    torch.testing.assert_close(logs["mask/final"], local_logs["mask/final"] * 5 / 6)
    torch.testing.assert_close(logs["dice/b0"], local_logs["dice/b0"] * 5 / 6)
    torch.testing.assert_close(logs["class/b0"], local_logs["class/b0"])

    # A rank without targets still joins the all_reduce, or the other ranks would hang.
    empty = random_batch([0, 0])
    make_loss(RecordingDraw())(*empty)
    assert reduced == [5.0, 0.0]


def test_bad_inputs_are_named():
    mask_logits, class_logits, targets = random_batch([2])
    with pytest.raises(ValueError, match="num_classes"):
        MaskClassificationLoss(NUM_CLASSES + 1)(mask_logits, class_logits, targets)
    targets[0]["labels"][0] = NUM_CLASSES
    with pytest.raises(ValueError, match="target labels"):
        make_loss(RecordingDraw())(mask_logits, class_logits, targets)
    with pytest.raises(ValueError, match="one class_logits"):
        make_loss(RecordingDraw())(mask_logits, class_logits[:1], targets)
    with pytest.raises(ValueError, match="loss.matching_points='per_block'"):
        make_loss(RecordingDraw(), matching_points="per_block")


def test_class_ids_are_exchangeable():
    """No class id is special (0 as padding, say): renaming the classes, in the targets and in the
    class logits' columns alike, leaves the loss and every term as they were."""
    mask_logits, class_logits, targets = random_batch([3, 0, 2, 4], num_blocks=2)
    assert any(0 in t["labels"] for t in targets)
    rename = torch.tensor([2, 0, 3, 1])  # class c becomes rename[c]; "no object" stays last
    renamed_logits = []
    for logits in class_logits:
        renamed = logits.clone()
        renamed[..., rename] = logits[..., :NUM_CLASSES]
        renamed_logits.append(renamed)
    renamed_targets = [{"masks": t["masks"], "labels": rename[t["labels"]]} for t in targets]

    total, logs = make_loss(RecordingDraw())(mask_logits, class_logits, targets)
    renamed_total, renamed_logs = make_loss(RecordingDraw())(mask_logits, renamed_logits, renamed_targets)
    torch.testing.assert_close(renamed_total, total)
    for name, value in logs.items():
        torch.testing.assert_close(renamed_logs[name], value)
