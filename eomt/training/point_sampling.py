"""Sampling mask logits / masks at continuous points (PointRend, as used by Mask2Former).

Points are (x, y) in [0, 1] relative to the mask, so the same points address a 1/4-resolution
prediction and a full-resolution target alike.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Draws uniform [0, 1) float32 numbers of the given shape on the given device. Injectable so that
# tests (and debugging) can record or fix the random points.
PointDraw = Callable[[tuple[int, ...], torch.device], Tensor]


def uniform_points(shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.rand(shape, device=device)


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample (N, C, H, W) features at (N, P, 2) points in [0, 1] -> (N, C, P)."""
    grid = 2.0 * coords.unsqueeze(2) - 1.0
    return F.grid_sample(features, grid, align_corners=False).squeeze(3)


def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    draw: PointDraw = uniform_points,
) -> Tensor:
    """Points where (R, 1, H, W) mask logits are least certain, plus uniform ones -> (R, num_points, 2).

    Draw `num_points * oversample_ratio` uniform candidates per mask, keep the
    `importance_sample_ratio * num_points` with logits closest to 0, fill up with fresh uniform points.
    """
    num_masks = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    if num_uncertain > num_candidates:
        raise ValueError(
            f"importance_sample_ratio * num_points ({num_uncertain}) exceeds the "
            f"{num_candidates} oversampled candidates; raise oversample_ratio"
        )
    candidates = draw((num_masks, num_candidates, 2), logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    top = uncertainty.topk(num_uncertain, dim=1).indices
    coords = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, draw((num_masks, num_random, 2), logits.device)], dim=1)
    return coords
