"""Mask-annealing schedule: the probability that each query block uses masked attention.

Block i's probability is 1 until `starts[i]`, decays as `(1 - (t - start) / (end - start)) ** power`
until `ends[i]`, and is 0 from then on.
"""

import math


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def default_annealing_windows(total_steps: int, num_blocks: int) -> tuple[list[int], list[int]]:
    """The published windows: block i anneals from `T/6 + i * (T/2) / (L2 - 1)` for `T/6` steps.

    Every block is fully masked until T/6 and the last window ends at 5T/6. With one query block the
    spread term vanishes: its window is [T/6, T/3].
    """
    if total_steps <= 0 or num_blocks <= 0:
        raise ValueError(f"total_steps ({total_steps}) and num_blocks ({num_blocks}) must be positive")
    window = total_steps / 6
    spacing = (total_steps / 2) / (num_blocks - 1) if num_blocks > 1 else 0.0
    starts = [window + i * spacing for i in range(num_blocks)]
    return [_round_half_up(s) for s in starts], [_round_half_up(s + window) for s in starts]


def annealing_windows(
    total_steps: int,
    num_blocks: int,
    starts: list[int | None] | None = None,
    ends: list[int | None] | None = None,
) -> tuple[list[int], list[int]]:
    """Per-block (starts, ends): the defaults, where given overridden entry by entry.

    `starts` / `ends` hold one entry per query block; None keeps that block's default. The DINOv3
    recipe anneals the first block from 0 to 3000: `starts=[0, None, None, None]`,
    `ends=[3000, None, None, None]`.
    """
    default_starts, default_ends = default_annealing_windows(total_steps, num_blocks)
    resolved = []
    for label, given, default in (("starts", starts, default_starts), ("ends", ends, default_ends)):
        if given is None:
            resolved.append(default)
            continue
        if len(given) != num_blocks:
            raise ValueError(
                f"annealing {label} has {len(given)} entries but the model has {num_blocks} query blocks; "
                "give one per block (null keeps the default)"
            )
        resolved.append([d if g is None else int(g) for g, d in zip(given, default, strict=True)])
    return resolved[0], resolved[1]


def annealing_probs(step: int, starts: list[int], ends: list[int], power: float = 0.9) -> list[float]:
    """Masked-attention probability of each query block at `step`."""
    if len(starts) != len(ends):
        raise ValueError(f"annealing starts ({len(starts)}) and ends ({len(ends)}) need one entry per block")
    probs = []
    for start, end in zip(starts, ends, strict=True):
        if end < start:
            raise ValueError(f"annealing window ends ({end}) before it starts ({start})")
        if step < start:
            probs.append(1.0)
        elif step >= end:
            probs.append(0.0)
        else:
            probs.append((1.0 - (step - start) / (end - start)) ** power)
    return probs
