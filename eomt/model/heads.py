"""EoMT's small heads: the mask-embedding MLP and the upscale blocks that lift patch tokens to 1/4 scale."""

import math

from timm.layers import LayerNorm2d
from torch import Tensor, nn


def mask_mlp(dim: int) -> nn.Sequential:
    """Linear-GELU-Linear-GELU-Linear; the linears sit at indices 0, 2, 4 (the authors' key names)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


class ScaleBlock(nn.Module):
    """x2 upsampling: ConvTranspose2d(k2, s2) -> GELU -> depthwise 3x3 (no bias) -> channel LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)
        self.conv2.weight.register_hook(self._grad_in_weight_layout)

    def _grad_in_weight_layout(self, grad: Tensor) -> Tensor:
        # The depthwise conv's backward gives its (dim, 1, 3, 3) weight gradient stride 1 on the size-1
        # dimension, the weight has 9. Autograd accepts that (size-1 strides do not matter) but DDP
        # compares strides exactly with its buckets, laid out like the weights, and warns "grad
        # strides do not match bucket view strides" on every run. The same elements, restrided.
        weight = self.conv2.weight
        return grad if grad.stride() == weight.stride() else grad.as_strided(weight.shape, weight.stride())

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


def num_upscale_blocks(patch_size: tuple[int, int]) -> int:
    """Blocks needed to go from 1/patch to 1/4 resolution (at least one)."""
    return max(1, int(math.log2(max(patch_size))) - 2)


def upscale(dim: int, patch_size: tuple[int, int], count: int | None = None) -> nn.Sequential:
    """`count` blocks (default: enough for 1/4 resolution); 0 keeps masks at the patch grid."""
    count = num_upscale_blocks(patch_size) if count is None else count
    if count < 0:
        raise ValueError(f"model.num_upscale_blocks={count} must be >= 0 (or null for 1/4 resolution)")
    return nn.Sequential(*[ScaleBlock(dim) for _ in range(count)])
