"""The backbone's transformer blocks as EoMT runs them.

timm's block modules take only `x`. EoMT needs per-sample attention masks in its query blocks and rotary
embeddings on the patch tokens only, so each timm block is re-housed in a module of ours: the same children
and parameters under the same names (state dicts and checkpoints are unchanged), with a forward that takes
EoMT's arguments. Because a block is a plain module whose forward does the whole block, the usual per-block
tools apply to it as to any transformer: `block.compile(fullgraph=True)` (one shared graph for every block),
FSDP's `fully_shard(block)` and activation checkpointing.
"""

from __future__ import annotations

from typing import Any

from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from eomt.model.attention import attention
from eomt.model.registry import lookup


class _RehousedBlock(nn.Module):
    """A timm block's children, parameters and buffers, registered under their own names."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in block.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in block._non_persistent_buffers_set)

    def attend(self, x: Tensor, rope: Tensor | None, num_unroped: int, attn_mask: Tensor | None) -> Tensor:
        return attention(self.attn, self.norm1(x), rope=rope, num_unroped=num_unroped, attn_mask=attn_mask)


class ViTBlock(_RehousedBlock):
    """timm `Block` (DINOv2, DeiT-III, ...): pre-norm attention and MLP with layer scale."""

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        num_unroped: int = 0,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, N, D); rope skips the first `num_unroped` tokens; attn_mask bool (B, 1, N, N), True = may attend."""
        x = x + self.drop_path1(self.ls1(self.attend(x, rope, num_unroped, attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class EvaStyleBlock(_RehousedBlock):
    """timm `EvaBlock` (DINOv3, EVA-02, ...): layer scale as optional `gamma_1` / `gamma_2` parameters."""

    def __init__(self, block: nn.Module):
        super().__init__(block)
        if block.gamma_1 is None:  # not parameters then, so not re-registered above
            self.gamma_1 = self.gamma_2 = None

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        num_unroped: int = 0,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        y = self.attend(x, rope, num_unroped, attn_mask)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = x + self.drop_path1(y)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path2(y)


BLOCKS: dict[type, type[_RehousedBlock]] = {Block: ViTBlock, EvaBlock: EvaStyleBlock}


def rehouse_blocks(blocks: Any) -> None:
    """Replace every timm block of `blocks` (the backbone's Sequential / ModuleList) by EoMT's, in place."""
    for index, block in enumerate(blocks):
        if not isinstance(block, _RehousedBlock):
            blocks[index] = lookup(BLOCKS, block, "block")(block)
