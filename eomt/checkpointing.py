"""Complete, atomic training checkpoints and the resume lookup.

A run directory holds `checkpoints/step_00001234.pt` files. A file only ever appears under its
final name once it is completely written (temp file + `os.replace`), so the newest one is always
safe to resume from, even after a hard kill.
"""

from __future__ import annotations

import ast
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eomt import distributed, model_zoo
from eomt.atomic import atomic_open, disk_full_as_one_line
from eomt.errors import CheckpointError, ConfigError, DiskFullError
from eomt.model.weight_formats import load_weights_only

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: str | Path, note: str = "") -> None:
    """torch.save to a temp file in the same folder, then rename over `path`. A full disk: one
    DiskFullError naming the folder and the checkpoint's size, with `note` added."""
    with disk_full_as_one_line(path, tensor_bytes(obj), note), atomic_open(path, "wb") as f:
        torch.save(obj, f)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nested state (about the size torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Writes `step_N.pt` files into `folder`, keeps the newest `keep_last`, finds the latest.

    On start it removes the temp files of writes that a kill interrupted (each as large as a
    checkpoint). On resume an unreadable newest checkpoint is renamed to `*.corrupt` (kept for a
    look, never deleted) and the previous one is used.
    """

    def __init__(self, folder: str | Path, keep_last: int = 2, clean_up: bool = True):
        """`clean_up=False` for readers (evaluate.py on a run that may be writing right now)."""
        if keep_last < 1:
            raise ConfigError(f"trainer.keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        if clean_up:
            self._remove_interrupted_writes()

    @staticmethod
    def file_name(step: int) -> str:
        return f"step_{step:08d}.pt"

    def _remove_interrupted_writes(self) -> None:
        if not self.folder.is_dir():
            return
        for tmp in self.folder.glob(".step_*.pt.*.tmp"):  # eomt.atomic's temp names
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted checkpoint write", tmp)

    def checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        files = self.checkpoints()
        return files[-1] if files else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.folder / self.file_name(step)
        latest = self.latest()
        resume = (
            f"; the run resumes from step {int(_STEP_FILE.match(latest.name).group(1))} ({latest.name})"
            if latest
            else "; the run starts again from step 0"
        )
        atomic_save(state, path, note=resume)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """One checkpoint; CheckpointError naming the file when it cannot be read."""
        return load_weights_only(path)

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its contents, or None when there is none yet.

        Unreadable ones (truncated, garbage, zero-filled, empty) are renamed to `*.corrupt` with a
        warning naming them; CheckpointError when checkpoints exist but none can be read.
        """
        found = self.checkpoints()
        for path in reversed(found):
            try:
                return path, self.load(path)
            except CheckpointError as error:
                corrupt = _set_aside(path)
                log.warning("%s; renamed it to %s and trying the previous checkpoint", error, corrupt.name)
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {self.folder} can be read (renamed to *.corrupt); "
                "set trainer.resume=never to start again, or name=... for a new run directory"
            )
        return None


def _set_aside(path: Path) -> Path:
    """Rename `path` to `path.corrupt` (`.corrupt1`, ... when taken); another rank may have done it."""
    for n in range(100):
        target = path.with_name(f"{path.name}.corrupt{n or ''}")
        if target.exists():
            continue
        try:
            path.rename(target)
        except FileNotFoundError:  # another rank renamed it first
            pass
        return target
    raise CheckpointError(f"cannot set {path} aside: 100 *.corrupt files already exist next to it")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or Transformers folder as given; a run directory -> its newest checkpoint;
    a hub name (tue-mps/<repo>, hf://<org>/<repo>) -> its weights in the Hugging Face cache."""
    if model_zoo.hub_repo(path) is not None:
        return model_zoo.download(path)
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a training run directory
        latest = CheckpointManager(path / "checkpoints", clean_up=False).latest()
        if latest is None:
            raise CheckpointError(f"run directory {path} has no checkpoint yet; train it first")
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint={path} does not exist; fix the path")
    return path


def save_training_state(
    checkpoints: CheckpointManager,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: dict[str, Any],
    counters: dict[str, int] | None = None,
) -> Path:
    """Write the training state after `step` steps; every rank calls it, rank 0 writes.

    Saved: the bare model's state dict, optimiser, scaler, step, every rank's RNG streams, the
    resolved config and `counters` (plain ints the loop carries, e.g. skipped steps). The data
    position is the step: the sampler and the augmentation draws are functions of it. Returns the
    checkpoint's path on every rank, once it is complete.
    """
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        **(counters or {}),
        "rng": distributed.all_gather_object(rng_state()),
        "config": config,
    }
    path, disk_full = None, None
    if distributed.is_main():
        try:
            path = checkpoints.save(state, step)
        except DiskFullError as e:  # every rank stops with the same line, none waits for the others
            disk_full = str(e)
    distributed.barrier()
    path, disk_full = distributed.broadcast_object((path, disk_full))
    if disk_full is not None:
        raise DiskFullError(disk_full)
    return Path(path)


def restore_training_state(
    state: dict[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    """Put a state that `save_training_state` wrote (as `CheckpointManager.load*` returns it) into the
    given objects and this rank's RNG streams.

    Returns the checkpoint's plain entries (step and counters) for the loop to continue from.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rngs, rank = state["rng"], distributed.rank()
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return {k: v for k, v in state.items() if isinstance(v, int)}
