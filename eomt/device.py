"""Where a run computes: the torch device from `trainer.device`, the autocast dtype of a precision, and the
autocast of an inference forward pass (CUDA and CPU precisions)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch

from eomt.errors import ConfigError

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str) -> torch.device:
    """`auto`: cuda when visible, else cpu; `cuda`: this local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is visible; use trainer.device=cpu")
    if name == "cuda":  # one GPU per local rank; `% count` also covers one visible GPU per task
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        name = f"cuda:{local_rank % torch.cuda.device_count()}"
    return torch.device(name)


CPU_PRECISIONS = ("fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16); None where unknown."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def training_precision(precision: str, device: torch.device) -> str:
    """`trainer.precision` on `device`: any on CUDA; fp32 or bf16 on the CPU (bf16 warns where the CPU has
    no native bf16: emulated, it is slower than fp32); fp16 needs CUDA's GradScaler path."""
    if precision not in AMP_DTYPES:
        raise ConfigError(f"trainer.precision={precision} is not one of {'|'.join(AMP_DTYPES)}")
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("trainer.precision=fp16 trains on CUDA only; on the CPU use bf16 or fp32")
    if device.type == "cpu" and precision == "bf16" and cpu_has_native_bf16() is False:
        _warn_once(
            "trainer.precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there and slower "
            "than fp32 (trainer.precision=fp32)"
        )
    return precision


def inference_autocast(
    device: torch.device, precision: str = "fp32", cpu_precision: str = "fp32"
) -> contextlib.AbstractContextManager:
    """Autocast of an inference forward pass: `precision` on CUDA, `cpu_precision` (fp32 | bf16) on the CPU."""
    if device.type == "cpu":
        if cpu_precision not in CPU_PRECISIONS:
            raise ConfigError(f"eval.cpu_precision={cpu_precision} is not one of {'|'.join(CPU_PRECISIONS)}")
        dtype = AMP_DTYPES[cpu_precision]
        if dtype is not None and cpu_has_native_bf16() is False:
            _warn_once(
                "eval.cpu_precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there and "
                "slower than fp32"
            )
    else:
        dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger("eomt").warning(message)
