"""What sits between the backbone and the Transformer decoder.

- `SimpleFeaturePyramid` (ViTDet): multi-scale maps from the ViT's last 1/16 map alone.
- `MSDeformAttnPixelDecoder` (Mask2Former): deformable-attention encoder over the 1/8-1/32 maps
  plus an FPN step to 1/4.
- `DirectFeatures`: no pixel decoder, the maps are used as they are.

A pixel decoder maps backbone maps (fine to coarse, with their strides) to
`(mask_features (B, mask_dim, H/4, W/4), memory)`, where `memory` lists the maps the Transformer
decoder cross-attends to, coarse to fine (Mask2Former's order: 1/32, 1/16, 1/8).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from eomt.model.heads import ScaleBlock
from eomt.model.mask2former.deformable_attention import (
    MSDeformAttn,
    flatten_levels,
    reference_points,
    unflatten_levels,
)
from eomt.model.mask2former.position_encoding import sine_position_encoding

MASK_STRIDE = 4  # masks are predicted at 1/4 of the input


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _upsample_4x(dim: int) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
        LayerNorm2d(dim // 2),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
    )


# ViTDet's resampling stages by scale factor relative to the 1/16 input: (module builder, output width).
_PYRAMID_STAGES: dict[float, Callable[[int], tuple[nn.Module, int]]] = {
    4.0: lambda dim: (_upsample_4x(dim), dim // 4),
    2.0: lambda dim: (nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2),
    1.0: lambda dim: (nn.Identity(), dim),
    0.5: lambda dim: (nn.MaxPool2d(2, stride=2), dim),
}


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one 1/`patch_size` map: deconvolutions for 1/4 and 1/8, identity for
    1/16, max-pooling for 1/32; each level then gets 1x1 and 3x3 convolutions with LayerNorm.
    `scales=(1.0,)` keeps only the single-scale 1/16 level."""

    def __init__(
        self,
        embed_dim: int,
        out_channels: int = 256,
        scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5),
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        unknown = set(scales) - set(_PYRAMID_STAGES)
        if unknown:
            raise ValueError(f"unsupported scales {sorted(unknown)}; choose from {sorted(_PYRAMID_STAGES)}")
        self.strides = [round(patch_size / s) for s in scales]
        self.out_channels = [out_channels] * len(scales)
        self.stages = nn.ModuleList()
        for scale in scales:
            resample, width = _PYRAMID_STAGES[scale](embed_dim)
            self.stages.append(
                nn.Sequential(
                    resample,
                    nn.Conv2d(width, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    def forward(self, vit_map: torch.Tensor) -> list[torch.Tensor]:
        return [stage(vit_map) for stage in self.stages]


def _projection(in_channels: int, out_channels: int) -> nn.Module:
    if in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), group_norm(out_channels))


class DirectFeatures(nn.Module):
    """No pixel decoder: the finest map gives the mask features (upscaled to 1/4 with EoMT's
    upscale blocks when it is coarser), the maps at stride >= 8 are the decoder's memory.
    Maps whose width differs from `hidden_dim` get a 1x1 projection first."""

    def __init__(self, in_channels: list[int], strides: list[int], hidden_dim: int = 256) -> None:
        super().__init__()
        if strides != sorted(strides) or strides[0] < MASK_STRIDE:
            raise ValueError(f"strides must be ascending and >= {MASK_STRIDE}, got {strides}")
        self.memory_levels = [i for i, s in enumerate(strides) if s >= 2 * MASK_STRIDE][::-1]
        self.num_memory_levels = len(self.memory_levels)
        if not self.memory_levels:
            raise ValueError(f"no map at stride >= {2 * MASK_STRIDE} for the decoder to attend to: {strides}")
        self.projections = nn.ModuleList([_projection(c, hidden_dim) for c in in_channels])
        num_upscales = int(math.log2(strides[0] // MASK_STRIDE))
        self.upscale = nn.Sequential(*[ScaleBlock(hidden_dim) for _ in range(num_upscales)])

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = [proj(m) for proj, m in zip(self.projections, maps, strict=True)]
        return self.upscale(maps[0]), [maps[i] for i in self.memory_levels]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: multi-scale deformable self-attention, then a ReLU FFN."""

    def __init__(
        self, dim: int, num_heads: int, num_levels: int, num_points: int, dim_feedforward: int
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, points: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        tokens = self.norm1(tokens + self.self_attn(tokens + pos, points, tokens, shapes))
        return self.norm2(tokens + self.linear2(F.relu(self.linear1(tokens))))


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder: the maps at stride >= 8 are projected to `hidden_dim` and refined
    jointly by `num_layers` deformable-attention encoder layers; finer maps (1/4) join through an
    FPN step (lateral 1x1 + upsampled coarser map + 3x3); a 1x1 conv on the result gives the mask
    features."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
    ) -> None:
        super().__init__()
        if strides != sorted(strides) or strides[0] != MASK_STRIDE:
            raise ValueError(f"strides must be ascending from {MASK_STRIDE}, got {strides}")
        self.num_fpn_levels = sum(s < 2 * MASK_STRIDE for s in strides)
        coarse_channels = in_channels[self.num_fpn_levels :][::-1]  # coarse to fine
        self.num_memory_levels = len(coarse_channels)
        if not self.num_memory_levels:
            raise ValueError(f"no map at stride >= {2 * MASK_STRIDE}: {strides}")
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), group_norm(hidden_dim)) for c in coarse_channels]
        )
        self.level_embed = nn.Parameter(torch.zeros(self.num_memory_levels, hidden_dim))
        self.layers = nn.ModuleList(
            [
                DeformableEncoderLayer(
                    hidden_dim, num_heads, self.num_memory_levels, num_points, dim_feedforward
                )
                for _ in range(num_layers)
            ]
        )
        fine_channels = in_channels[: self.num_fpn_levels][::-1]  # coarse to fine
        self.lateral_convs = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), group_norm(hidden_dim))
                for c in fine_channels
            ]
        )
        self.output_convs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, bias=False),
                    group_norm(hidden_dim),
                    nn.ReLU(inplace=True),
                )
                for _ in fine_channels
            ]
        )
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        for conv in [
            *(m[0] for m in self.lateral_convs),
            *(m[0] for m in self.output_convs),
            self.mask_features,
        ]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        coarse = [proj(m) for proj, m in zip(self.input_proj, maps[self.num_fpn_levels :][::-1], strict=True)]
        tokens, shapes = flatten_levels(coarse)
        pos = torch.cat(
            [
                (
                    sine_position_encoding(h, w, tokens.shape[-1], device=tokens.device, dtype=tokens.dtype)
                    .flatten(2)
                    .transpose(1, 2)
                    + embed
                )
                for (h, w), embed in zip(shapes, self.level_embed, strict=True)
            ],
            dim=1,
        )
        points = reference_points(shapes, tokens.device).to(tokens.dtype)
        for layer in self.layers:
            tokens = layer(tokens, pos, points, shapes)
        outputs = unflatten_levels(tokens, shapes)

        fine = maps[: self.num_fpn_levels][::-1]
        for x, lateral, output_conv in zip(fine, self.lateral_convs, self.output_convs, strict=True):
            coarser = F.interpolate(outputs[-1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(output_conv(lateral(x) + coarser))
        return self.mask_features(outputs[-1]), outputs[: self.num_memory_levels]
