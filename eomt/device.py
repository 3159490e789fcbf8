"""Where a run computes: the torch device from `trainer.device` and the autocast dtype of a precision."""

from __future__ import annotations

import os

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
