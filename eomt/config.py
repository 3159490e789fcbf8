"""Compose the Hydra config from the repository's conf/ outside a Hydra app (API, tests, benchmarks)."""

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """`config_name` from conf/ with command-line overrides, e.g. ["model=vit_s", "model.num_blocks=2"]."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no config {config_name}.yaml in {CONF_DIR}: pass an existing config_name")
    running_app = (
        get_gh_backup()
    )  # inside a Hydra app (evaluate.py loading a released model): put it back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    finally:
        restore_gh_from_backup(running_app)
