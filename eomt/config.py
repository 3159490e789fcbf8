"""Compose the Hydra config from the repository's conf/ outside a Hydra app (API, tests, benchmarks)."""

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """`config_name` from conf/ with command-line overrides, e.g. ["model=vit_s", "model.num_blocks=2"]."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no config {config_name}.yaml in {CONF_DIR}: pass an existing config_name")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
