"""Record what produced a run: the resolved config and the code version, in its directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from eomt.atomic import write_json, write_text


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def write_run_info(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config and the code version, so every run directory says what produced it."""
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "run_info.json", {"git_commit": git_commit(), "torch": torch.__version__}, indent=2)
