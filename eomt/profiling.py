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
    expanded parameters (the Mask2Former baseline's). Compiled regions run eagerly here: Dynamo cannot
    trace under the counter's dispatch mode and would count graph breaks for nothing."""
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
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


# Dense bf16 tensor-core peaks (TFLOP/s) by CUDA device name, most specific first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s, or None for a GPU not in BF16_PEAK_TFLOPS."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def training_mfu(forward_gflops_per_image: float, images_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: forward + backward counted as 3 forwards, over the peak."""
    return 3 * forward_gflops_per_image * 1e9 * images_per_s / peak_flops
