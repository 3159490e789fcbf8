"""Image sizes as the configs write them (one int for a square, or [H, W])."""

from collections.abc import Sequence


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of `size`: an int is a square."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)
