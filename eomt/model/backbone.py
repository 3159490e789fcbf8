"""The timm ViT inside EoMT: creation, token embedding and block forward on the backbone's own modules.

Two timm families are supported, each through one small adapter: `VisionTransformer` (DINOv2, DeiT-III,
...) and `Eva` (DINOv3, EVA-02, ...: rotary position embedding). Block forwards are ours so that every
attention goes through `eomt.model.attention.attention` (SDPA, masks, rope on patch tokens only).
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
from timm.models.eva import Eva, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from eomt.model.attention import attention, qkv_projection

Attend = Callable[[nn.Module, Tensor], Tensor]


def create_backbone(
    name: str,
    img_size: tuple[int, int],
    patch_size: int,
    pretrained: bool,
    pretrained_file: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm ViT with the given patch size and input size, without classifier or pooling norm.

    `pretrained_file` points timm's pretrained loading (with its patch/position embedding resampling)
    at a local file instead of the hub.
    """
    if pretrained_file is not None and not pretrained:
        raise ValueError(
            f"model.pretrained_file={pretrained_file} is set but model.pretrained=false: "
            "set model.pretrained=true to load it, or model.pretrained_file=null"
        )
    if pretrained_file is not None and not Path(pretrained_file).is_file():
        raise FileNotFoundError(f"model.pretrained_file={pretrained_file} does not exist: fix the path")
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


def _vit_block(block: nn.Module, x: Tensor, attend: Attend) -> Tensor:
    x = x + block.drop_path1(block.ls1(attend(block.attn, block.norm1(x))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _eva_block(block: nn.Module, x: Tensor, attend: Attend) -> Tensor:
    y = attend(block.attn, block.norm1(x))
    if block.gamma_1 is not None:
        y = block.gamma_1 * y
    x = x + block.drop_path1(y)
    y = block.mlp(block.norm2(x))
    if block.gamma_2 is not None:
        y = block.gamma_2 * y
    return x + block.drop_path2(y)


def _vit_has_patch_dropout(backbone: nn.Module) -> bool:
    return not isinstance(backbone.patch_drop, nn.Identity)


def _eva_has_patch_dropout(backbone: nn.Module) -> bool:
    return backbone.patch_drop is not None


@dataclass(frozen=True)
class Family:
    """How EoMT drives one timm model class."""

    embed: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor | None]]
    has_patch_dropout: Callable[[nn.Module], bool]
    blocks: dict[type, Callable[[nn.Module, Tensor, Attend], Tensor]]


FAMILIES: dict[type, Family] = {
    VisionTransformer: Family(_vit_embed, _vit_has_patch_dropout, {Block: _vit_block}),
    Eva: Family(_eva_embed, _eva_has_patch_dropout, {EvaBlock: _eva_block}),
}


def _lookup(registry: dict[type, Any], obj: object, what: str) -> Any:
    for cls in type(obj).__mro__:
        if cls in registry:
            return registry[cls]
    supported = ", ".join(c.__name__ for c in registry)
    raise TypeError(f"EoMT cannot drive {what} {type(obj).__name__}: supported are {supported}")


class BackboneRunner:
    """Runs the timm ViT it was built from token by token: embedding, then any block with an optional mask.

    Not a module: it holds plain functions and a reference to the backbone (the owning network keeps
    the backbone as its `.backbone` submodule), never parameters of its own.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        family: Family = _lookup(FAMILIES, backbone, "backbone")
        if family.has_patch_dropout(backbone):
            raise ValueError("EoMT needs every patch token: set model.backbone_kwargs.patch_drop_rate=0")
        self._embed = family.embed
        self._block_forwards = [_lookup(family.blocks, block, "block") for block in backbone.blocks]
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

    def block(
        self,
        index: int,
        x: Tensor,
        rope: Tensor | None,
        num_unroped: int,
        attn_mask: Tensor | None,
    ) -> Tensor:
        """Block `index` on x; rope skips the first `num_unroped` tokens."""
        if rope is not None and self.rope_per_block:
            rope = rope[index]
        attend = partial(attention, rope=rope, num_unroped=num_unroped, attn_mask=attn_mask)
        return self._block_forwards[index](self.backbone.blocks[index], x, attend)
