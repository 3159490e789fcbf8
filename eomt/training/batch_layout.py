"""How the total batch splits over ranks and gradient-accumulation steps (train.py, the memory planner)."""

from __future__ import annotations

from eomt.errors import ConfigError


def batch_layout(batch_size: int, micro_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation steps) so that micro * world * accum == batch_size."""
    micro = micro_batch_size or max(1, batch_size // world_size)
    if batch_size % (micro * world_size):
        raise ConfigError(
            f"trainer.batch_size={batch_size} is not a multiple of micro_batch_size={micro} x {world_size} "
            "ranks (GPUs); choose trainer.micro_batch_size so that it divides"
        )
    return micro, batch_size // (micro * world_size)
