"""Hungarian matching of predicted masks to target masks (Mask2Former's cost)."""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


class HungarianMatcher:
    """Match queries to targets for every prediction point (block) and image at once.

    Cost of query q for target n: `class_weight * -p_q(label_n) + mask_weight * BCE(q, n)
    + dice_weight * dice(q, n)`, the mask terms on points shared by all masks of an image (per
    block, or one set for every block).
    All cost matrices come from batched einsums on the device; only the assignment itself runs on
    the CPU (scipy's `linear_sum_assignment`, once per block and image).
    """

    def __init__(self, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0):
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight

    @torch.no_grad()
    def costs(
        self, mask_logits: Tensor, class_logits: Tensor, target_masks: Tensor, target_labels: Tensor
    ) -> Tensor:
        """Cost matrices (K, B, Q, N).

        mask_logits (K, B, Q, P): predicted mask logits at the image's P points, for K blocks;
        class_logits (K, B, Q, C+1); target_masks (K, B, N, P) in [0, 1] at the same points, padded
        to N targets per image, or (B, N, P) when every block uses the same points; target_labels
        (B, N) (padding: any valid class id).
        """
        mask_logits = mask_logits.float()
        target_masks = target_masks.float()
        if target_masks.dim() == 3:
            target_masks = target_masks.expand(mask_logits.shape[0], -1, -1, -1)
        num_points = mask_logits.shape[-1]

        probs = class_logits.float().softmax(-1)
        labels = target_labels[None, :, None, :].expand(*probs.shape[:3], -1)
        cost_class = -probs.gather(3, labels)

        # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), averaged over the points.
        cost_mask = (
            torch.einsum("kbqp,kbnp->kbqn", F.softplus(-mask_logits), target_masks)
            + torch.einsum("kbqp,kbnp->kbqn", F.softplus(mask_logits), 1.0 - target_masks)
        ) / num_points

        pred = mask_logits.sigmoid()
        numerator = 2.0 * torch.einsum("kbqp,kbnp->kbqn", pred, target_masks)
        denominator = pred.sum(-1)[..., None] + target_masks.sum(-1)[:, :, None, :]
        cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)

        return self.class_weight * cost_class + self.mask_weight * cost_mask + self.dice_weight * cost_dice

    @torch.no_grad()
    def __call__(
        self,
        mask_logits: Tensor,
        class_logits: Tensor,
        target_masks: Tensor,
        target_labels: Tensor,
        num_targets: Tensor,
    ) -> Tensor:
        """Query index matched to each target -> (K, B, N) int64; -1 for padding and unmatched targets.

        Inputs as in `costs`; num_targets (B,): image b's targets are its first num_targets[b] slots.
        A target stays unmatched only when an image has more targets than queries.
        """
        num_blocks, batch_size, _, max_targets = (*mask_logits.shape[:3], target_masks.shape[-2])
        costs = self.costs(mask_logits, class_logits, target_masks, target_labels).cpu().numpy()
        counts = num_targets.tolist()
        matched = np.full((num_blocks, batch_size, max_targets), -1, dtype=np.int64)
        for k in range(num_blocks):
            for b in range(batch_size):
                if counts[b] == 0:
                    continue
                queries, targets = linear_sum_assignment(costs[k, b, :, : counts[b]])
                matched[k, b, targets] = queries
        return torch.from_numpy(matched).to(mask_logits.device)
