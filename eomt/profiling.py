"""Cost of a network's forward pass: parameters, GFLOPs (torch.utils.flop_counter) and images/s,
and how busy other processes kept this process's CPUs while a speed was measured (`LoadMeter`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

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


@torch.inference_mode()  # as the predictors: a compiled network's graphs serve both without recompiling
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


# --- was the speed measured alone? --------------------------------------------------------------------
# A speed timed while other processes compete for the same CPUs is not comparable with one timed alone
# (a sweep's jobs timing each other gave 0.9 to 2.6 FPS for networks of one size). What tells them apart
# is measured over the timed span itself, on the CPUs this process may run on (/proc/stat, per CPU):
# - other_load: their busy time minus that of this process and its children (/proc/<pid>/stat: its own
#   data-loading workers are not "others"), as a share of those CPUs' time;
# - idle: the share of those CPUs' time nobody used.
# A speed counts as measured under load when others took more than UNDER_LOAD and the CPUs were
# saturated (idle under SATURATED): where CPUs stay idle no thread of ours waited for one, so another
# job's data workers on a 16-core GPU node do not mark a GPU's FPS. A load average would lag by a
# minute and count processes waiting on disk; the ratio of own CPU time to wall time drops as much for
# a single-threaded stretch of the forward pass as for a competitor. Other processes on a GPU itself
# are not seen.
UNDER_LOAD = 0.25
SATURATED = 0.10
PROC = Path("/proc")


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


def _busy_cpu_s(cpus: set[int]) -> float | None:
    """Busy seconds (not idle, not waiting on I/O) of `cpus` since boot, from /proc/stat; None off Linux."""
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
    return busy / _ticks_per_s()


def _tree_cpu_s() -> float:
    """CPU seconds used so far by this process and its live descendants (DataLoader workers)."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        parents[int(entry.name)] = int(fields[1])
        used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _ticks_per_s()  # utime + stime
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(used.get(pid, 0.0) for pid in tree)


class LoadMeter:
    """How busy other processes kept this process's CPUs since `start()`.

    `conditions()` -> {"other_load": 0 (alone) .. 1, "idle": 0 .. 1, "under_load": bool}; the shares are
    None (and under_load False) where /proc cannot be read.
    """

    def __init__(self) -> None:
        self.cpus = (
            os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        )
        self.start()

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._busy = _busy_cpu_s(self.cpus)
        self._own = _tree_cpu_s() if self._busy is not None else 0.0

    def conditions(self) -> dict[str, float | bool | None]:
        busy = _busy_cpu_s(self.cpus)
        if busy is None or self._busy is None:
            return {"other_load": None, "idle": None, "under_load": False}
        capacity = max((time.perf_counter() - self._wall) * len(self.cpus), 1e-9)
        others = (busy - self._busy) - (_tree_cpu_s() - self._own)
        other_load = min(1.0, max(0.0, others / capacity))
        idle = min(1.0, max(0.0, 1.0 - (busy - self._busy) / capacity))
        return {
            "other_load": other_load,
            "idle": idle,
            "under_load": other_load > UNDER_LOAD and idle < SATURATED,
        }
