"""The timm ViT inside EoMT: creation, token embedding and block forward on the backbone's own modules.

Two timm families are supported, each through one small adapter: `VisionTransformer` (DINOv2, DeiT-III,
...) and `Eva` (DINOv3, EVA-02, ...: rotary position embedding). The blocks are re-housed in EoMT's
own block modules (`eomt.model.blocks`) so that every attention goes through `eomt.model.attention.attention`
(SDPA, masks, rope on patch tokens only).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from eomt.errors import ConfigError
from eomt.model.attention import qkv_projection
from eomt.model.blocks import rehouse_blocks
from eomt.model.registry import lookup
from eomt.model.transformers_backbone import create_transformers_backbone, is_hub_backbone


def create_backbone(
    name: str,
    img_size: tuple[int, int],
    patch_size: int,
    pretrained: bool,
    pretrained_file: str | Path | None = None,
    config: Mapping | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm ViT with the given patch size and input size, without classifier or pooling norm.

    `pretrained_file` points timm's pretrained loading (with its patch/position embedding resampling)
    at a local file instead of the hub. A `name` of the form org/repo is a Transformers hub backbone,
    built from its config (`config`, else the repo's config.json: `eomt.model.transformers_backbone`).
    """
    if pretrained_file is not None and not pretrained:
        raise ValueError(
            f"model.pretrained_file={pretrained_file} is set but model.pretrained=false: "
            "set model.pretrained=true to load it, or model.pretrained_file=null"
        )
    if pretrained_file is not None and not Path(pretrained_file).is_file():
        raise FileNotFoundError(f"model.pretrained_file={pretrained_file} does not exist: fix the path")
    if is_hub_backbone(name):
        return create_transformers_backbone(
            name, img_size, patch_size, pretrained, pretrained_file, config, **kwargs
        )
    if config is not None:
        raise ConfigError(
            f"model.backbone_config is set but model.backbone={name} is a timm model: it is for a "
            "Transformers hub backbone (org/name); set model.backbone_config=null"
        )
    overlay = {"file": str(pretrained_file)} if pretrained_file is not None else None
    # global_pool="" keeps the final norm in `backbone.norm` (avg-pool models would move it to fc_norm).
    options = {"num_classes": 0, "global_pool": "", **kwargs}
    return timm.create_model(
        name,
        pretrained=pretrained,
        pretrained_cfg_overlay=overlay,
        img_size=img_size,
        patch_size=patch_size,
        **options,
    )


def _vit_embed(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    tokens = backbone._pos_embed(backbone.patch_embed(images))
    return backbone.norm_pre(tokens), None


def _eva_embed(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    tokens, rope = backbone._pos_embed(backbone.patch_embed(images))
    return backbone.norm_pre(tokens), rope


def _vit_has_patch_dropout(backbone: nn.Module) -> bool:
    return not isinstance(backbone.patch_drop, nn.Identity)


def _eva_has_patch_dropout(backbone: nn.Module) -> bool:
    return backbone.patch_drop is not None


@dataclass(frozen=True)
class Family:
    """How EoMT drives one timm model class (its blocks: `eomt.model.blocks`)."""

    embed: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor | None]]
    has_patch_dropout: Callable[[nn.Module], bool]


FAMILIES: dict[type, Family] = {
    VisionTransformer: Family(_vit_embed, _vit_has_patch_dropout),
    Eva: Family(_eva_embed, _eva_has_patch_dropout),
}


class BackboneRunner:
    """Runs the timm ViT it was built from token by token: embedding, then any block with an optional mask.

    Not a module: it holds plain functions and a reference to the backbone (the owning network keeps
    the backbone as its `.backbone` submodule), never parameters of its own. It re-houses the backbone's
    blocks in EoMT's block modules (`eomt.model.blocks`: same parameter names) when it is made.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        family: Family = lookup(FAMILIES, backbone, "backbone")
        if family.has_patch_dropout(backbone):
            raise ValueError("EoMT needs every patch token: set model.backbone_kwargs.patch_drop_rate=0")
        self._embed = family.embed
        rehouse_blocks(backbone.blocks)
        for block in backbone.blocks:
            qkv_projection(block.attn)  # fail at construction, not in the first forward
        self.patch_size: tuple[int, int] = tuple(backbone.patch_embed.patch_size)
        self.num_prefix_tokens: int = backbone.num_prefix_tokens
        self.rope_per_block: bool = bool(getattr(backbone, "rope_mixed", False))

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Tokens [prefix | patches] (B, N, D), the rotary embedding (or None) and the patch grid."""
        grid = (images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1])
        tokens, rope = self._embed(self.backbone, images)
        return tokens, rope, grid

    def block_rope(self, rope: Tensor | None, index: int) -> Tensor | None:
        """The rotary embedding block `index` applies (mixed-mode rope has one per block)."""
        return rope[index] if rope is not None and self.rope_per_block else rope

    def block(
        self,
        index: int,
        x: Tensor,
        rope: Tensor | None,
        num_unroped: int,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """Block `index` on x; rope skips the first `num_unroped` tokens."""
        return self.backbone.blocks[index](x, self.block_rope(rope, index), num_unroped, attn_mask)
