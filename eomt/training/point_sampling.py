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
    logits: Tensor, candidates: Tensor, num_uncertain: int, extra: Tensor | None = None
) -> Tensor:
    """Points where (R, 1, H, W) mask logits are least certain, plus uniform ones -> (R, U + E, 2).

    Among the (R, C, 2) uniform `candidates` keep the `num_uncertain` (U) whose logits are closest
    to 0 (in candidate order on ties, as topk gives), then append the (R, E, 2) uniform `extra` points.
    """
    if num_uncertain > candidates.shape[1]:
        raise ValueError(
            f"{num_uncertain} uncertain points cannot be picked among {candidates.shape[1]} candidates; "
            "raise oversample_ratio"
        )
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()
    top = uncertainty.topk(num_uncertain, dim=1).indices
    coords = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    return coords if extra is None else torch.cat([coords, extra], dim=1)
