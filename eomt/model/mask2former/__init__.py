"""ViT + Mask2Former baselines of the paper's component-removal path (Table 1), steps 0-3."""

from eomt.model.mask2former.deformable_attention import MSDeformAttn, ms_deform_attn
from eomt.model.mask2former.network import Mask2FormerViT
from eomt.model.mask2former.pixel_decoder import (
    DirectFeatures,
    MSDeformAttnPixelDecoder,
    SimpleFeaturePyramid,
)
from eomt.model.mask2former.transformer_decoder import MaskedTransformerDecoder
from eomt.model.mask2former.vit_adapter import ViTAdapter

__all__ = [
    "DirectFeatures",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerViT",
    "MaskedTransformerDecoder",
    "SimpleFeaturePyramid",
    "ViTAdapter",
    "ms_deform_attn",
]
