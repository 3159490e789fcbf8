"""Running the backbone for the Mask2Former baselines: the same timm ViT / Eva as EoMT, driven by
EoMT's `BackboneRunner` (embedding, then blocks one at a time, rotary embeddings included)."""

import torch

from eomt.model.backbone import BackboneRunner


def run_blocks(
    runner: BackboneRunner, tokens: torch.Tensor, rope: torch.Tensor | None, blocks: range
) -> torch.Tensor:
    for index in blocks:
        tokens = runner.block(index, tokens, rope, runner.num_prefix_tokens, None)
    return tokens


def patch_map(runner: BackboneRunner, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens [prefix | patches] -> the patches after the backbone's final norm, as (B, D, h, w)."""
    patches = runner.backbone.norm(tokens)[:, runner.num_prefix_tokens :]
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)


def feature_map(runner: BackboneRunner, images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> the ViT's last features as a 1/patch map (B, D, H/p, W/p)."""
    tokens, rope, grid = runner.embed(images)
    tokens = run_blocks(runner, tokens, rope, range(len(runner.backbone.blocks)))
    return patch_map(runner, tokens, grid)
