"""ViT-Adapter (Chen et al., ICLR 2023): multi-scale features for a plain ViT.

A small CNN (the spatial prior module) makes 1/4 .. 1/32 features. At evenly spaced depths an
interaction block lets the two streams talk through deformable cross-attention: the injector
writes the CNN features into the ViT tokens before a group of blocks, the extractor reads the
ViT tokens back into the CNN features after it (followed by a convolutional FFN).
Output: four maps at strides 4, 8, 16, 32, each with the ViT's width.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from eomt.model.backbone import BackboneRunner
from eomt.model.mask2former import vit as vit_ops
from eomt.model.mask2former.deformable_attention import (
    MSDeformAttn,
    SpatialShapes,
    flatten_levels,
    reference_points,
    unflatten_levels,
)


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """ResNet-like stem: images -> maps at strides 4, 8, 16, 32, projected to `dim` channels."""

    def __init__(self, dim: int, channels: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *conv_bn_relu(3, channels, 2),
            *conv_bn_relu(channels, channels, 1),
            *conv_bn_relu(channels, channels, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*conv_bn_relu(channels, 2 * channels, 2)),
                nn.Sequential(*conv_bn_relu(2 * channels, 4 * channels, 2)),
                nn.Sequential(*conv_bn_relu(4 * channels, 4 * channels, 2)),
            ]
        )
        widths = [channels, 2 * channels, 4 * channels, 4 * channels]
        self.projections = nn.ModuleList([nn.Conv2d(w, dim, 1) for w in widths])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = [self.stem(images)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return [proj(m) for proj, m in zip(self.projections, maps, strict=True)]


class MultiLevelDWConv(nn.Module):
    """3x3 depthwise convolution applied to each level of a flattened multi-level token sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, spatial_shapes: SpatialShapes) -> torch.Tensor:
        maps = [self.conv(m) for m in unflatten_levels(tokens, spatial_shapes)]
        return flatten_levels(maps)[0]


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = MultiLevelDWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor, spatial_shapes: SpatialShapes) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(tokens), spatial_shapes)))


class Injector(nn.Module):
    """ViT patch tokens += gamma * deformable attention over the multi-scale CNN features."""

    def __init__(
        self, dim: int, num_heads: int, num_points: int, value_ratio: float, init_values: float
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 3, num_heads, num_points, value_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(
        self, patches: torch.Tensor, points: torch.Tensor, features: torch.Tensor, shapes: SpatialShapes
    ) -> torch.Tensor:
        attended = self.attn(self.query_norm(patches), points, self.feat_norm(features), shapes)
        return patches + self.gamma * attended


class Extractor(nn.Module):
    """Multi-scale CNN tokens += deformable attention over the ViT patch map, then a conv FFN."""

    def __init__(
        self, dim: int, num_heads: int, num_points: int, value_ratio: float, ffn_ratio: float
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 1, num_heads, num_points, value_ratio)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * ffn_ratio))

    def forward(
        self,
        queries: torch.Tensor,
        query_shapes: SpatialShapes,
        points: torch.Tensor,
        patches: torch.Tensor,
        patch_shape: SpatialShapes,
    ) -> torch.Tensor:
        queries = queries + self.attn(self.query_norm(queries), points, self.feat_norm(patches), patch_shape)
        return queries + self.ffn(self.ffn_norm(queries), query_shapes)


class InteractionBlock(nn.Module):
    """Injector -> a group of ViT blocks -> extractor(s)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_points: int,
        value_ratio: float,
        ffn_ratio: float,
        init_values: float,
        num_extractors: int = 1,
    ) -> None:
        super().__init__()
        self.injector = Injector(dim, num_heads, num_points, value_ratio, init_values)
        self.extractors = nn.ModuleList(
            [Extractor(dim, num_heads, num_points, value_ratio, ffn_ratio) for _ in range(num_extractors)]
        )

    def forward(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        run_blocks: Callable[[torch.Tensor], torch.Tensor],
        num_prefix_tokens: int,
        patch_shape: SpatialShapes,
        feature_shapes: SpatialShapes,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: ViT sequence (B, prefix + h*w, D); features: CNN tokens (B, sum H_l*W_l, D)."""
        prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
        patch_points = reference_points(patch_shape, tokens.device)
        patches = self.injector(patches, patch_points, features, feature_shapes)
        tokens = run_blocks(torch.cat([prefix, patches], dim=1))
        patches = tokens[:, num_prefix_tokens:]
        feature_points = reference_points(feature_shapes, tokens.device)
        for extractor in self.extractors:
            features = extractor(features, feature_shapes, feature_points, patches, patch_shape)
        return tokens, features


class ViTAdapter(nn.Module):
    """Runs the backbone (passed to `forward`, owned by the caller) with adapter interactions.

    num_heads: deformable attention heads; by default embed_dim // 64 (ViT-Adapter's 6/12/16 for
    S/B/L). The last interaction has `extra_extractors` more extractors, as in the release.
    """

    strides = (4, 8, 16, 32)

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_interactions: int = 4,
        num_heads: int | None = None,
        num_points: int = 4,
        value_ratio: float = 0.5,
        ffn_ratio: float = 0.25,
        conv_channels: int = 64,
        init_values: float = 0.0,
        extra_extractors: int = 2,
    ) -> None:
        super().__init__()
        if not 1 <= num_interactions <= depth:
            raise ValueError(f"num_interactions must be in [1, {depth}], got {num_interactions}")
        num_heads = num_heads or max(1, embed_dim // 64)
        self.out_channels = [embed_dim] * 4
        # The interactions split the depth into even groups of blocks.
        bounds = [i * depth // num_interactions for i in range(num_interactions + 1)]
        self.block_groups = [range(start, end) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        self.spatial_prior = SpatialPriorModule(embed_dim, conv_channels)
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.interactions = nn.ModuleList(
            [
                InteractionBlock(
                    embed_dim,
                    num_heads,
                    num_points,
                    value_ratio,
                    ffn_ratio,
                    init_values,
                    num_extractors=1 + (extra_extractors if i == num_interactions - 1 else 0),
                )
                for i in range(num_interactions)
            ]
        )
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2)
        self.norms = nn.ModuleList([nn.BatchNorm2d(embed_dim) for _ in range(4)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, images: torch.Tensor, runner: BackboneRunner) -> list[torch.Tensor]:
        """Normalised images -> [1/4, 1/8, 1/16, 1/32] maps of width embed_dim."""
        c1, *coarser = self.spatial_prior(images)
        coarser = [m + e[None, :, None, None] for m, e in zip(coarser, self.level_embed, strict=True)]
        features, feature_shapes = flatten_levels(coarser)

        tokens, rope, grid = runner.embed(images)
        for blocks, interaction in zip(self.block_groups, self.interactions, strict=True):
            run_blocks = partial(vit_ops.run_blocks, runner, rope=rope, blocks=blocks)
            tokens, features = interaction(
                tokens, features, run_blocks, runner.num_prefix_tokens, [grid], feature_shapes
            )

        c2, c3, c4 = unflatten_levels(features, feature_shapes)
        c1 = c1 + self.up(c2)
        vit_map = vit_ops.patch_map(runner, tokens, grid)
        # The ViT's own features, resized to every level, are added to the adapter's.
        return [
            norm(cnn_map + resize_like(vit_map, cnn_map))
            for cnn_map, norm in zip([c1, c2, c3, c4], self.norms, strict=True)
        ]


def resize_like(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)
