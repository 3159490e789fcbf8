"""The two collectives evaluators need beyond eomt.distributed (no-ops in a single process)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from eomt import distributed


def sum_across_ranks(array: np.ndarray) -> np.ndarray:
    """Element-wise sum of a numpy array over all ranks (dtype kept)."""
    if not distributed.is_initialized():
        return array
    # NCCL only moves CUDA tensors, gloo only CPU ones.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return distributed.all_reduce_sum_(tensor).cpu().numpy()


def gather_to_main(obj: Any) -> list[Any] | None:
    """`[obj of rank 0, obj of rank 1, ...]` on rank 0, None elsewhere (lighter than gathering everywhere)."""
    if not distributed.is_initialized():
        return [obj]
    gathered: list[Any] | None = [None] * distributed.world_size() if distributed.is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered
