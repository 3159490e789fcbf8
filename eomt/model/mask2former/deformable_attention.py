"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query looks at `num_points` learned sampling locations per head and per feature level,
placed around its reference point, and takes a softmax-weighted sum of the bilinearly sampled
values. Sampling uses `F.grid_sample`, so it runs on CPU and GPU alike and needs no custom kernel.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = list[tuple[int, int]]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and mix values at fractional locations over several feature levels.

    value: (B, S, M, Dh), the levels' flattened maps concatenated, S = sum of H*W, M heads.
    spatial_shapes: (H, W) of each level, in the order they are concatenated in `value`.
    sampling_locations: (B, Lq, M, L, P, 2) as (x, y) in [0, 1] relative to each level
        (0 = left/top edge of the map, 1 = right/bottom edge; pixel centres at (i + 0.5) / W).
    attention_weights: (B, Lq, M, L, P), summing to 1 over (L, P) per query and head.
    Returns (B, Lq, M * Dh). Locations outside the map read zeros.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, h*w, M, Dh) -> (B*M, Dh, h, w)
        value_map = value_per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B*M, Dh, Lq, L*P) weighted by (B*M, 1, Lq, L*P)
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * heads, 1, num_queries, num_levels * num_points
    )
    output = (samples * weights).sum(-1).view(batch, heads * head_dim, num_queries)
    return output.transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with value/output projections (Zhu et al., Deformable DETR).

    `value_ratio` < 1 shrinks the value width, as ViT-Adapter does (its `deform_ratio`).
    """

    def __init__(
        self,
        dim: int = 256,
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        value_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        value_dim = int(dim * value_ratio)
        if value_dim % num_heads:
            raise ValueError(f"value width {value_dim} is not divisible by {num_heads} heads")
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: heads start sampling along evenly spread directions,
        point k at distance k+1, with uniform attention weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        offsets = directions[:, None, None, :] * distances[None, None, :, None]
        offsets = offsets.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: SpatialShapes,
    ) -> torch.Tensor:
        """query: (B, Lq, C); reference_points: (B or 1, Lq, L or 1, 2) as (x, y) in [0, 1];
        features: (B, S, C), the levels of `spatial_shapes` flattened and concatenated.
        Returns (B, Lq, C)."""
        batch, num_queries, _ = query.shape
        if len(spatial_shapes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels, got {len(spatial_shapes)}")
        value = self.value_proj(features).view(batch, features.shape[1], self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        # Offsets are in pixels of each level: divide by (W, H) to make them relative. Sampling runs in
        # float32 under autocast too: bf16 locations would be off by up to a pixel on large maps.
        sizes_wh = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=torch.float32, device=query.device)
        locations = reference_points.float()[:, :, None, :, None, :] + offsets.float() / sizes_wh[:, None, :]
        sampled = ms_deform_attn(value.float(), spatial_shapes, locations, weights.float())
        return self.output_proj(sampled.to(value.dtype))


def reference_points(spatial_shapes: SpatialShapes, device: torch.device | None = None) -> torch.Tensor:
    """Pixel centres of every level, flattened and concatenated: (1, sum H*W, 1, 2) as (x, y) in [0, 1]."""
    points = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    return torch.cat(points)[None, :, None, :]


def flatten_levels(maps: list[torch.Tensor]) -> tuple[torch.Tensor, SpatialShapes]:
    """(B, C, H_l, W_l) maps -> (B, sum H_l*W_l, C) tokens and the levels' (H, W)."""
    shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1), shapes


def unflatten_levels(tokens: torch.Tensor, spatial_shapes: SpatialShapes) -> list[torch.Tensor]:
    """Inverse of `flatten_levels`: (B, sum H*W, C) -> list of (B, C, H, W)."""
    batch, _, channels = tokens.shape
    chunks = tokens.split([h * w for h, w in spatial_shapes], dim=1)
    return [
        chunk.transpose(1, 2).reshape(batch, channels, h, w)
        for chunk, (h, w) in zip(chunks, spatial_shapes, strict=True)
    ]
