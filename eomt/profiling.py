"""Cost of a network's forward pass: parameters, GFLOPs (torch.utils.flop_counter) and images/s."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

# PyTorch counts the CUDA attention kernels but not the CPU one, which would leave attention (a third of
# a ViT's FLOPs at 640 px) out of every CPU count.
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_ATTENTION is not None and _CPU_ATTENTION not in flop_registry:

    @register_flop_formula(_CPU_ATTENTION)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass (a multiply-add counts 2) divided by the batch size, in 1e9.

    Grad mode stays as the caller has it: under no_grad the counter's module tracker trips over
    expanded parameters (the Mask2Former baseline's)."""
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() / images.shape[0] / 1e9


@torch.no_grad()
def images_per_second(network: nn.Module, images: torch.Tensor, iters: int = 20, warmup: int = 3) -> float:
    """Forward passes of `network` (compiled or not) on `images`, timed after `warmup` untimed ones."""
    synchronize = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    for _ in range(warmup):
        network(images)
    synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        network(images)
    synchronize()
    return iters * images.shape[0] / (time.perf_counter() - start)
