"""Training state: the counters a run carries (`TrainState`) and complete, atomic checkpoints of it.

A run directory holds `checkpoints/step_00001234.pt` files. A file only ever appears under its
final name once it is completely written (temp file + `os.replace`), so the newest one is always
safe to resume from, even after a hard kill. `CheckpointManager` writes them on its own cadence
(`maybe_save(step, last)`) and restores the newest; reading a checkpoint into a network, whatever
its origin (a file, a run directory, a hub name), is the loading side's (`eomt.api`).
"""

from __future__ import annotations

import ast
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from eomt import distributed
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


class Stateful(Protocol):
    """What a checkpoint holds a part of: a module, an optimiser, a GradScaler, the TrainState."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainState:
    """The counters the loop carries from step to step; `state_dict()` goes into every checkpoint."""

    step: int = 0  # optimisation steps done
    skipped_steps: int = 0  # steps skipped for a non-finite loss, in all
    bad_steps: int = 0  # non-finite losses in a row (not saved: a resumed run starts a new count)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps = 0


class CheckpointManager:
    """Writes `step_N.pt` files into `folder`, keeps the newest `keep_last`, finds the latest.

    On start it removes the temp files of writes that a kill interrupted (each as large as a
    checkpoint). On resume an unreadable newest checkpoint is renamed to `*.corrupt` (kept for a
    look, never deleted) and the previous one is used.

    Given the training state (`train_state`, the `parts` such as model / optimizer / scaler, and the
    resolved `config`), it also saves and restores it (torchtitan's CheckpointManager): the loop calls
    `maybe_save(step, last)` after every step, and this decides (every `every_steps` steps, the last one).
    """

    def __init__(
        self,
        folder: str | Path,
        keep_last: int = 2,
        clean_up: bool = True,
        *,
        every_steps: int | None = None,
        train_state: TrainState | None = None,
        parts: Mapping[str, Stateful] | None = None,
        config: dict[str, Any] | None = None,
    ):
        """`clean_up=False` for readers (evaluate.py on a run that may be writing right now)."""
        if keep_last < 1:
            raise ConfigError(f"trainer.keep_last must be >= 1, got {keep_last}")
        if every_steps is not None and every_steps < 1:
            raise ConfigError(f"trainer.ckpt_every_steps must be >= 1, got {every_steps}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.every_steps = every_steps
        self.train_state = train_state
        self.parts = dict(parts or {})
        self.config = config
        self._saved: tuple[int, Path] | None = None  # (step, file) of this run's newest checkpoint
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

    # --- the training state -------------------------------------------------------------------
    def maybe_save(self, step: int, last: bool = False) -> Path | None:
        """Save the training state after `step` steps if it is due: every `every_steps`, and the last."""
        due = last or (self.every_steps is not None and step % self.every_steps == 0)
        return self.save_training_state(step) if due else None

    def save_training_state(self, step: int) -> Path:
        """Write the training state after `step` steps, unless that step is saved already; every rank
        calls it, rank 0 writes. Returns the checkpoint's path on every rank, once it is complete.

        Saved: each part's state dict under its name, the TrainState's counters, every rank's RNG
        streams and the resolved config. The data position is the step: the sampler and the
        augmentation draws are functions of it.
        """
        if self._saved is not None and self._saved[0] == step:
            return self._saved[1]
        if self.train_state is None:
            raise ValueError("CheckpointManager was built without a train_state: nothing to save")
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state.update(self.train_state.state_dict())
        state["rng"] = distributed.all_gather_object(rng_state())
        state["config"] = self.config
        path, disk_full = None, None
        if distributed.is_main():
            try:
                path = self.save(state, step)
            except DiskFullError as e:  # every rank stops with the same line, none waits for the others
                disk_full = str(e)
        distributed.barrier()
        path, disk_full = distributed.broadcast_object((path, disk_full))
        if disk_full is not None:
            raise DiskFullError(disk_full)
        self._saved = (step, Path(path))
        if distributed.is_main():
            log.info("saved %s", path)
        return self._saved[1]

    def restore_training_state(self) -> Path | None:
        """Put the newest readable checkpoint into the parts, the TrainState and this rank's RNG streams;
        its path, or None when there is none yet (nothing changed)."""
        if self.train_state is None:
            raise ValueError("CheckpointManager was built without a train_state: nothing to restore")
        found = self.load_latest()
        if found is None:
            return None
        path, state = found
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        self.train_state.load_state_dict(state)
        rngs, rank = state["rng"], distributed.rank()
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        self._saved = (self.train_state.step, path)
        return path


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
