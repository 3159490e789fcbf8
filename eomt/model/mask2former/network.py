"""ViT + Mask2Former with removable components: the paper's Table 1 path from ViT-Adapter +
Mask2Former towards EoMT.

    adapter  pixel_decoder  multi_scale
    true     true           true         step 0: ViT-Adapter + Mask2Former
    false    true           true         step 1: ViTDet simple feature pyramid instead of the adapter
    false    false          true         step 2: pyramid maps used directly (no pixel decoder)
    false    false          false        step 3: single 1/16 map, upscaled to 1/4 for the masks

Steps 4 and 5 drop the Transformer decoder too; they are `eomt.model.eomt.EoMT`.
Same forward contract as EoMT: images in [0, 1] -> (mask_logits list, class_logits list).
"""

from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from eomt.model.backbone import BackboneRunner, create_backbone
from eomt.model.mask2former import vit as vit_ops
from eomt.model.mask2former.pixel_decoder import (
    DirectFeatures,
    MSDeformAttnPixelDecoder,
    SimpleFeaturePyramid,
)
from eomt.model.mask2former.transformer_decoder import MaskedTransformerDecoder
from eomt.model.mask2former.vit_adapter import ViTAdapter
from eomt.model.size import as_pair

PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)  # 1/4, 1/8, 1/16, 1/32 from the 1/16 patch grid
SINGLE_SCALE = (1.0,)


class Mask2FormerViT(nn.Module):
    """A timm ViT (`self.backbone`, built as EoMT builds it) + Mask2Former heads; the three switches
    remove the ViT-Adapter, the pixel decoder and the multi-scale features (module docstring)."""

    def __init__(
        self,
        backbone: str,
        img_size: int | tuple[int, int],
        num_classes: int,
        num_queries: int = 200,
        patch_size: int = 16,
        pretrained: bool = False,
        adapter: bool = True,
        pixel_decoder: bool = True,
        multi_scale: bool = True,
        hidden_dim: int = 256,
        num_decoder_layers: int = 9,
        num_pixel_decoder_layers: int = 6,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        adapter_kwargs: dict | None = None,
        backbone_kwargs: dict | None = None,
        pretrained_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError(
                f"the adapter and the feature pyramid assume 1/16 ViT features, got patch {patch_size}"
            )
        if not multi_scale and (adapter or pixel_decoder):
            raise ValueError(
                "multi_scale=false needs adapter=false and pixel_decoder=false (steps 0-3 remove them first)"
            )
        self.img_size = as_pair(img_size)
        if multi_scale and any(s % 32 for s in self.img_size):
            raise ValueError(f"multi-scale features need an image size divisible by 32, got {self.img_size}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.backbone = create_backbone(
            backbone, self.img_size, patch_size, pretrained, pretrained_file, **dict(backbone_kwargs or {})
        )
        self._runner = BackboneRunner(self.backbone)
        embed_dim = self.backbone.embed_dim

        # Exactly one of adapter / pyramid makes the backbone's maps.
        self.adapter: ViTAdapter | None = None
        self.pyramid: SimpleFeaturePyramid | None = None
        if adapter:
            self.adapter = ViTAdapter(embed_dim, len(self.backbone.blocks), **dict(adapter_kwargs or {}))
            maps_from = self.adapter
        else:
            scales = PYRAMID_SCALES if multi_scale else SINGLE_SCALE
            self.pyramid = SimpleFeaturePyramid(embed_dim, hidden_dim, scales, patch_size)
            maps_from = self.pyramid
        in_channels, strides = list(maps_from.out_channels), list(maps_from.strides)

        self.pixel_decoder = (
            MSDeformAttnPixelDecoder(in_channels, strides, hidden_dim, hidden_dim, num_pixel_decoder_layers)
            if pixel_decoder
            else DirectFeatures(in_channels, strides, hidden_dim)
        )
        self.transformer_decoder = MaskedTransformerDecoder(
            num_classes,
            num_queries,
            hidden_dim,
            hidden_dim,
            num_decoder_layers,
            num_heads,
            dim_feedforward,
            num_levels=self.pixel_decoder.num_memory_levels,
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images: float (B, 3, H, W) in [0, 1] -> (mask_logits [(B,Q,H/4,W/4)], class_logits [(B,Q,C+1)]),
        the final prediction last; in training one entry per decoder layer plus the one before it."""
        x = (images - self.pixel_mean) / self.pixel_std
        if self.adapter is not None:
            maps = self.adapter(x, self._runner)
        else:
            maps = self.pyramid(vit_ops.feature_map(self._runner, x))
        mask_features, memory = self.pixel_decoder(maps)
        return self.transformer_decoder(memory, mask_features)
