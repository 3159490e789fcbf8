"""Mask-classification loss: Hungarian matching, then cross-entropy + mask BCE + dice (Mask2Former)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eomt import distributed
from eomt.errors import ConfigError
from eomt.training.matcher import HungarianMatcher
from eomt.training.point_sampling import PointDraw, point_sample, uncertain_point_coords, uniform_points


@dataclass
class _BatchTargets:
    masks: Tensor  # (T, H, W) float: every target mask of the batch, image after image
    labels: Tensor  # (B, N) int64, padded with 0
    counts: Tensor  # (B,) int64 on the CPU: targets per image
    image_index: Tensor  # (T,) int64: image of each target
    slot_index: Tensor  # (T,) int64: position of each target among its image's targets
    offsets: Tensor  # (B,) int64: row of each image's first target in `masks`


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Soft dice loss per mask over the last dimension (points), +1 smoothed."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def _num_masks_across_ranks(num_masks: int, device: torch.device) -> Tensor:
    total = distributed.all_reduce_sum_(torch.tensor(float(num_masks), device=device))
    return (total / distributed.world_size()).clamp(min=1.0)


MATCHING_POINTS = ("per_prediction", "shared")
MASK_NORMALIZATIONS = ("matched", "targets")


@dataclass
class _Points:
    """Every uniform point of one loss call, drawn up front in the release's order."""

    matching: Tensor  # (K, B, P, 2): the points each block's matching uses, per image
    candidates: Tensor  # (K, M, P*oversample_ratio, 2): candidates of each matched mask
    extra: Tensor | None  # (K, M, P - uncertain, 2): uniform points added to the uncertain ones


class MaskClassificationLoss(nn.Module):
    """Sum over prediction points (each query block's intermediate prediction and the final one) of
    `class_weight * CE + mask_weight * BCE + dice_weight * dice`, as the authors' release computes it.

    Per prediction point: match queries to targets per image (`HungarianMatcher`, mask costs on
    `num_points` uniform points shared by all masks of an image, drawn anew for every prediction);
    cross-entropy over C+1 classes for all queries (unmatched ones -> "no object", weighted
    `no_object_weight`); BCE and dice of every matched mask on `num_points` points chosen by
    uncertainty, summed and divided by the number of matched masks averaged over ranks (at least 1).

    Options (the release's behaviour first): `matching_points="shared"` draws one set of matching
    points per image and reuses it for every prediction; `mask_normalization="targets"` divides by
    the number of target masks instead (Mask2Former's count; smaller terms when an image has more
    targets than queries).

    `draw_points(shape, device)` supplies every uniform random number, in the release's order: for
    each prediction point, the matching points of each image (1, P, 2) (with "shared", only before the
    first), then the candidates (M, P*oversample_ratio, 2) and the extra points
    (M, P - int(P*importance_sample_ratio), 2) of its M matched masks, image after image and, within
    an image, by query index.
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
        matching_points: str = "per_prediction",
        mask_normalization: str = "matched",
        draw_points: PointDraw = uniform_points,
    ):
        super().__init__()
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ConfigError(
                f"loss.importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
            )
        if oversample_ratio < importance_sample_ratio:
            raise ConfigError(
                f"loss.oversample_ratio ({oversample_ratio}) must be >= loss.importance_sample_ratio "
                f"({importance_sample_ratio}) to pick the uncertain points among the candidates"
            )
        if matching_points not in MATCHING_POINTS:
            raise ConfigError(f"loss.matching_points={matching_points!r}; choose one of {MATCHING_POINTS}")
        if mask_normalization not in MASK_NORMALIZATIONS:
            raise ConfigError(
                f"loss.mask_normalization={mask_normalization!r}; choose one of {MASK_NORMALIZATIONS}"
            )
        self.num_classes = num_classes
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.class_weight = class_weight
        self.no_object_weight = no_object_weight
        self.matching_points = matching_points
        self.mask_normalization = mask_normalization
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
            num_matched = int(batch.counts.clamp(max=masks_pred.shape[2]).sum())  # the same in every block
            points = self._draw(len(mask_logits), len(targets), num_matched, device)
            matched = self._match(masks_pred, classes_pred, batch, points.matching)  # (K, B, N)
            class_losses = self._class_losses(classes_pred, matched, batch)
            mask_losses, dice_losses = self._mask_losses(masks_pred, matched, batch, points)

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
            offsets=torch.tensor(
                [sum(counts[:b]) for b in range(len(counts))], dtype=torch.long, device=device
            ),
        )

    def _draw(self, num_blocks: int, batch_size: int, num_matched: int, device: torch.device) -> _Points:
        num_candidates = int(self.num_points * self.oversample_ratio)
        num_extra = self.num_points - int(self.num_points * self.importance_sample_ratio)
        matching, candidates, extra = [], [], []
        for k in range(num_blocks):
            if k == 0 or self.matching_points == "per_prediction":
                matching.append(
                    torch.cat([self.draw_points((1, self.num_points, 2), device) for _ in range(batch_size)])
                )
            else:
                matching.append(matching[0])
            candidates.append(self.draw_points((num_matched, num_candidates, 2), device))
            if num_extra > 0:
                extra.append(self.draw_points((num_matched, num_extra, 2), device))
        return _Points(
            matching=torch.stack(matching),
            candidates=torch.stack(candidates),
            extra=torch.stack(extra) if extra else None,
        )

    @torch.no_grad()
    def _match(
        self, masks_pred: Tensor, classes_pred: Tensor, batch: _BatchTargets, points: Tensor
    ) -> Tensor:
        """points: (K, B, P, 2), each block's matching points per image."""
        num_blocks, batch_size, num_queries = masks_pred.shape[:3]
        pred_at_points = point_sample(masks_pred.flatten(0, 1), points.flatten(0, 1))
        pred_at_points = pred_at_points.view(num_blocks, batch_size, num_queries, self.num_points)
        target_at_points = torch.zeros(
            num_blocks, batch_size, batch.labels.shape[1], self.num_points, device=masks_pred.device
        )
        if len(batch.masks):
            # Sample each target once for all blocks: its K point sets side by side.
            per_target = points[:, batch.image_index].transpose(0, 1).reshape(len(batch.masks), -1, 2)
            sampled = point_sample(batch.masks[:, None], per_target)[:, 0]  # (T, K*P)
            sampled = sampled.view(-1, num_blocks, self.num_points).transpose(0, 1)  # (K, T, P)
            target_at_points[:, batch.image_index, batch.slot_index] = sampled
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
        self, masks_pred: Tensor, matched: Tensor, batch: _BatchTargets, points: _Points
    ) -> tuple[Tensor, Tensor]:
        """BCE and dice per prediction point -> (K,), (K,), summed over matched masks / number of masks."""
        num_blocks, _, num_queries = masks_pred.shape[:3]
        num_matched = points.candidates.shape[1]
        count = num_matched if self.mask_normalization == "matched" else len(batch.masks)
        num_masks = _num_masks_across_ranks(count, masks_pred.device)  # every rank must take part
        if num_matched == 0:
            zero = masks_pred.sum(dim=(1, 2, 3, 4)) * 0.0  # keeps the mask head in the graph
            return zero, zero.clone()

        # Matched pairs per block in the release's order: image after image, queries ascending.
        block, image, slot = (matched >= 0).nonzero(as_tuple=True)
        query = matched[block, image, slot]
        order = ((block * matched.shape[1] + image) * num_queries + query).argsort()
        image, query = image[order].view(num_blocks, -1), query[order].view(num_blocks, -1)
        target = batch.offsets[image] + slot[order].view(num_blocks, -1)  # (K, M) rows of batch.masks
        blocks = torch.arange(num_blocks, device=masks_pred.device)[:, None]
        pred = masks_pred[blocks, image, query].flatten(0, 1)[:, None]  # (K*M, 1, h, w)

        with torch.no_grad():
            coords = uncertain_point_coords(
                pred,
                points.candidates.flatten(0, 1),
                int(self.num_points * self.importance_sample_ratio),
                None if points.extra is None else points.extra.flatten(0, 1),
            ).view(num_blocks, num_matched, self.num_points, 2)
            # Sample each full-resolution target once for all blocks: its K point sets side by side
            # (zeros where a block left it unmatched).
            per_target = coords.new_zeros(num_blocks, len(batch.masks), self.num_points, 2)
            per_target[blocks, target] = coords
            sampled = point_sample(batch.masks[:, None], per_target.transpose(0, 1).flatten(1, 2))[:, 0]
            sampled = sampled.view(-1, num_blocks, self.num_points).transpose(0, 1)  # (K, T, P)
            target_points = sampled[blocks, target]  # (K, M, P)

        pred_points = point_sample(pred, coords.flatten(0, 1)).view(num_blocks, num_matched, self.num_points)
        bce = F.binary_cross_entropy_with_logits(pred_points, target_points, reduction="none").mean(-1)
        dice = dice_loss(pred_points, target_points)
        return bce.sum(1) / num_masks, dice.sum(1) / num_masks
