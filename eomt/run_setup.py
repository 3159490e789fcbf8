"""What every entry point does before its real work: check the config, pick the device, record the run."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from eomt.atomic import write_json, write_text
from eomt.model.checkpoints import CheckpointError

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@contextmanager
def one_line_errors():
    """Missing files and unusable checkpoints end the program with one line naming the fix."""
    try:
        yield
    except (FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None


def check_config(cfg: DictConfig) -> None:
    """Fail in one line on combinations the config groups cannot express."""
    task = cfg.task.name
    if task not in cfg.dataset:
        supported = [t for t in ("panoptic", "semantic", "instance") if t in cfg.dataset]
        raise SystemExit(
            f"error: dataset {cfg.dataset.name} has no {task} annotations; use task={'|'.join(supported)}"
        )
    if cfg.trainer.resume not in ("auto", "never"):
        raise SystemExit(f"error: trainer.resume={cfg.trainer.resume} is not one of auto|never")
    precision = cfg.trainer.precision
    if precision not in AMP_DTYPES:
        raise SystemExit(f"error: trainer.precision={precision} is not one of {'|'.join(AMP_DTYPES)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"error: trainer.device={name} but no CUDA device is visible; use trainer.device=cpu"
        )
    if name == "cuda":  # one GPU per local rank; `% count` also covers one visible GPU per task
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        name = f"cuda:{local_rank % torch.cuda.device_count()}"
    return torch.device(name)


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
