"""Mask-classification loss: Hungarian matching, then cross-entropy + mask BCE + dice (Mask2Former)."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from eomt.training.matcher import HungarianMatcher
from eomt.training.point_sampling import PointDraw, point_sample, uncertain_point_coords, uniform_points


@dataclass
class _BatchTargets:
    masks: Tensor  # (T, H, W) float: every target mask of the batch, image after image
    labels: Tensor  # (B, N) int64, padded with 0
    counts: Tensor  # (B,) int64 on the CPU: targets per image
    image_index: Tensor  # (T,) int64: image of each target
    slot_index: Tensor  # (T,) int64: position of each target among its image's targets


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft dice loss per mask over the last dimension (points), +1 smoothed."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def _num_masks_across_ranks(num_masks: int, device: torch.device) -> Tensor:
    total = torch.tensor(float(num_masks), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return total.clamp(min=1.0)


class MaskClassificationLoss(nn.Module):
    """Sum over prediction points (each query block's intermediate prediction and the final one) of
    `class_weight * CE + mask_weight * BCE + dice_weight * dice`.

    Per prediction point: match queries to targets per image (`HungarianMatcher`, mask costs on
    `num_points` uniform points shared by all masks of an image); cross-entropy over C+1 classes for
    all queries (unmatched ones -> "no object", weighted `no_object_weight`); BCE and dice of every
    matched mask on `num_points` points chosen by uncertainty, summed and divided by the number of
    target masks averaged over ranks (at least 1).

    `draw_points(shape, device)` supplies every uniform random number, in this order: the matching
    points (B, P, 2), then the candidate points (K*T, P*oversample_ratio, 2) and the extra uniform
    points (K*T, P - int(P*importance_sample_ratio), 2) of `uncertain_point_coords`, where K is the
    number of prediction points and T the number of target masks in the batch (image after image,
    the same T rows for every block).
    """

    def __init__(
        self,
        num_classes: int,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        class_weight: float = 2.0,
        no_object_weight: float = 0.1,
        draw_points: PointDraw = uniform_points,
    ):
        super().__init__()
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        if oversample_ratio < importance_sample_ratio:
            raise ValueError(
                f"oversample_ratio ({oversample_ratio}) must be >= importance_sample_ratio "
                f"({importance_sample_ratio}) to pick the uncertain points among the candidates"
            )
        self.num_classes = num_classes
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.class_weight = class_weight
        self.no_object_weight = no_object_weight
        self.draw_points = draw_points
        self.matcher = HungarianMatcher(
            class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight
        )

    def forward(
        self, mask_logits: list[Tensor], class_logits: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """mask_logits: K x (B, Q, h, w); class_logits: K x (B, Q, C+1); targets: B dicts with
        `masks` bool (N, H, W) and `labels` int64 (N,). Returns the weighted total and, detached and
        unweighted, `class/<p>`, `mask/<p>`, `dice/<p>` for p = b0 .. b{K-2}, final.
        """
        self._check_inputs(mask_logits, class_logits, targets)
        device = mask_logits[0].device
        with torch.autocast(device.type, enabled=False):
            masks_pred = torch.stack([m.float() for m in mask_logits])  # (K, B, Q, h, w)
            classes_pred = torch.stack([c.float() for c in class_logits])  # (K, B, Q, C+1)
            batch = self._collect_targets(targets, device)
            matched = self._match(masks_pred, classes_pred, batch)  # (K, B, N)
            class_losses = self._class_losses(classes_pred, matched, batch)
            mask_losses, dice_losses = self._mask_losses(masks_pred, matched, batch)

        total = (
            self.class_weight * class_losses.sum()
            + self.mask_weight * mask_losses.sum()
            + self.dice_weight * dice_losses.sum()
        )
        names = [f"b{i}" for i in range(len(mask_logits) - 1)] + ["final"]
        logs: dict[str, Tensor] = {}
        for i, name in enumerate(names):
            logs[f"class/{name}"] = class_losses[i].detach()
            logs[f"mask/{name}"] = mask_losses[i].detach()
            logs[f"dice/{name}"] = dice_losses[i].detach()
        return total, logs

    def _check_inputs(
        self, mask_logits: list[Tensor], class_logits: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> None:
        if len(mask_logits) == 0 or len(mask_logits) != len(class_logits):
            raise ValueError(
                f"need one class_logits per mask_logits entry (>= 1), got {len(mask_logits)} mask and "
                f"{len(class_logits)} class predictions"
            )
        if class_logits[0].shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"class_logits have {class_logits[0].shape[-1]} classes; MaskClassificationLoss("
                f"num_classes={self.num_classes}) expects num_classes + 1 (the last is 'no object')"
            )
        if len(targets) != mask_logits[0].shape[0]:
            raise ValueError(
                f"got {len(targets)} target dicts for a batch of {mask_logits[0].shape[0]} images"
            )

    def _collect_targets(self, targets: list[dict[str, Tensor]], device: torch.device) -> _BatchTargets:
        counts = [len(t["labels"]) for t in targets]
        labels = torch.zeros(len(targets), max(max(counts), 1), dtype=torch.long, device=device)
        for b, t in enumerate(targets):
            labels[b, : counts[b]] = t["labels"].to(device)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(
                f"target labels must be in [0, {self.num_classes}) (num_classes={self.num_classes}); "
                "check the dataset's num_classes"
            )
        image_index = [b for b, count in enumerate(counts) for _ in range(count)]
        slot_index = [slot for count in counts for slot in range(count)]
        return _BatchTargets(
            masks=torch.cat([t["masks"].to(device) for t in targets]).float(),
            labels=labels,
            counts=torch.tensor(counts, dtype=torch.long),
            image_index=torch.tensor(image_index, dtype=torch.long, device=device),
            slot_index=torch.tensor(slot_index, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def _match(self, masks_pred: Tensor, classes_pred: Tensor, batch: _BatchTargets) -> Tensor:
        num_blocks, batch_size, num_queries = masks_pred.shape[:3]
        points = self.draw_points((batch_size, self.num_points, 2), masks_pred.device)
        pred_at_points = point_sample(masks_pred.flatten(0, 1), points.repeat(num_blocks, 1, 1))
        pred_at_points = pred_at_points.view(num_blocks, batch_size, num_queries, self.num_points)
        target_at_points = torch.zeros(
            batch_size, batch.labels.shape[1], self.num_points, device=masks_pred.device
        )
        if len(batch.masks):
            sampled = point_sample(batch.masks[:, None], points[batch.image_index])[:, 0]
            target_at_points[batch.image_index, batch.slot_index] = sampled
        return self.matcher(pred_at_points, classes_pred, target_at_points, batch.labels, batch.counts)

    def _class_losses(self, classes_pred: Tensor, matched: Tensor, batch: _BatchTargets) -> Tensor:
        """Cross-entropy per prediction point -> (K,), a weighted mean over all queries of the batch."""
        num_blocks = classes_pred.shape[0]
        target_classes = torch.full(classes_pred.shape[:3], self.num_classes, device=classes_pred.device)
        block, image, slot = (matched >= 0).nonzero(as_tuple=True)
        target_classes[block, image, matched[block, image, slot]] = batch.labels[image, slot]

        class_weights = torch.ones(self.num_classes + 1, device=classes_pred.device)
        class_weights[-1] = self.no_object_weight
        per_query = F.cross_entropy(
            classes_pred.flatten(0, 2), target_classes.flatten(), weight=class_weights, reduction="none"
        )
        weight_sums = class_weights[target_classes].view(num_blocks, -1).sum(1)
        return per_query.view(num_blocks, -1).sum(1) / weight_sums

    def _mask_losses(
        self, masks_pred: Tensor, matched: Tensor, batch: _BatchTargets
    ) -> tuple[Tensor, Tensor]:
        """BCE and dice per prediction point -> (K,), (K,), summed over matched masks / number of masks."""
        num_blocks = masks_pred.shape[0]
        num_targets = len(batch.masks)
        num_masks = _num_masks_across_ranks(num_targets, masks_pred.device)  # every rank must take part
        if num_targets == 0:
            zero = masks_pred.sum(dim=(1, 2, 3, 4)) * 0.0  # keeps the mask head in the graph
            return zero, zero.clone()

        queries = matched[:, batch.image_index, batch.slot_index]  # (K, T)
        is_matched = (queries >= 0).float()
        blocks = torch.arange(num_blocks, device=masks_pred.device)[:, None]
        pred = masks_pred[blocks, batch.image_index[None], queries.clamp(min=0)]  # (K, T, h, w)
        pred = pred.flatten(0, 1)[:, None]  # (K*T, 1, h, w)

        with torch.no_grad():
            coords = uncertain_point_coords(
                pred, self.num_points, self.oversample_ratio, self.importance_sample_ratio, self.draw_points
            )
            # Sample each full-resolution target once for all blocks: its K point sets side by side.
            per_target = coords.view(num_blocks, num_targets, self.num_points, 2).transpose(0, 1)
            target_points = point_sample(batch.masks[:, None], per_target.reshape(num_targets, -1, 2))
            target_points = target_points.view(num_targets, num_blocks, self.num_points).transpose(0, 1)

        pred_points = point_sample(pred, coords).view(num_blocks, num_targets, self.num_points)
        bce = F.binary_cross_entropy_with_logits(pred_points, target_points, reduction="none").mean(-1)
        dice = dice_loss(pred_points, target_points)
        return (bce * is_matched).sum(1) / num_masks, (dice * is_matched).sum(1) / num_masks
