"""The OmegaConf resolvers that the configs in conf/ use, registered on import (by `import eomt`).
Only omegaconf is imported here: reading an exported file needs no Hydra."""

import os

from omegaconf import OmegaConf


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM allocation, taskset, a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_count(at_most: int | str) -> int:
    """`${workers:8}` in conf/: data-loading workers, at most `at_most`, never more than the CPUs
    this process may use minus one for the main process (each rank of a node calls it; SLURM's
    `cpus_per_task` gives each its share)."""
    return max(0, min(int(at_most), usable_cpus() - 1))


if not OmegaConf.has_resolver("workers"):
    OmegaConf.register_new_resolver("workers", worker_count)

# `${concat:${a},${b}}`: one list after the other (COCO's panoptic names = its things + stuff).
if not OmegaConf.has_resolver("concat"):
    OmegaConf.register_new_resolver("concat", lambda *lists: [item for items in lists for item in items])
