"""Training state: the counters a run carries (`TrainState`) and complete, atomic checkpoints of it.

A run directory holds `checkpoints/step_00001234.pt` files, or under trainer.strategy=fsdp sharded
`checkpoints/step_00001234/` directories (eomt.sharded: model and optimiser through Distributed
Checkpoint, every rank writing its shards). A file or directory only ever appears under its final name
once it is completely written (a temp file or directory, then a rename), so the newest one is always
safe to resume from, even after a hard kill. `CheckpointManager` writes them on its own cadence
(`maybe_save(step, last)`) and restores the newest; reading a checkpoint into a network, whatever
its origin (a file, a run directory, a hub name), is the loading side's (`eomt.api`).
"""

from __future__ import annotations

import ast
import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from eomt import distributed, sharded
from eomt.atomic import atomic_open, disk_full_as_one_line
from eomt.errors import CheckpointError, ConfigError, DiskFullError
from eomt.model.weight_formats import load_weights_only

log = logging.getLogger(__name__)

_STEP_FILE = re.compile(r"^step_(\d+)(\.pt)?$")  # step_N.pt files, sharded step_N/ directories
# What a sharded checkpoint holds through DCP; the rest goes into its train_state.pt.
_SHARDED_PARTS = ("model", "optimizer")


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
    """Writes `step_N.pt` files (`sharded=True`: `step_N/` DCP directories) into `folder`, keeps the
    newest `keep_last`, finds the latest (files and directories alike).

    On start it removes the temp files and directories of writes that a kill interrupted (each as large
    as a checkpoint). On resume an unreadable newest checkpoint is renamed to `*.corrupt` (kept for a
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
        sharded: bool = False,
    ):
        """`clean_up=False` for readers (evaluate.py on a run that may be writing right now).
        `sharded=True` (trainer.strategy=fsdp): the model and optimiser parts are saved as every rank's
        shards; restoring reads either kind on any number of ranks."""
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
        self.sharded = sharded
        self._saved: tuple[int, Path] | None = None  # (step, file) of this run's newest checkpoint
        if clean_up:
            self._remove_interrupted_writes()

    @staticmethod
    def file_name(step: int) -> str:
        return f"step_{step:08d}.pt"

    @staticmethod
    def dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def _remove_interrupted_writes(self) -> None:
        if not self.folder.is_dir():
            return
        for tmp in self.folder.glob(".step_*.tmp"):  # eomt.atomic's temp files, our temp directories
            _remove(tmp)
            log.info("removed %s, left by an interrupted checkpoint write", tmp)

    def checkpoints(self) -> list[Path]:
        """The checkpoints, oldest first: `step_N.pt` files and `step_N/` directories (a directory wins
        a tie on the step)."""
        if not self.folder.is_dir():
            return []
        found = [
            (int(m.group(1)), p.is_dir(), p)
            for p in self.folder.iterdir()
            if (m := _STEP_FILE.match(p.name)) and p.is_dir() != bool(m.group(2))
        ]
        return [p for *_, p in sorted(found)]

    def latest(self) -> Path | None:
        files = self.checkpoints()
        return files[-1] if files else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.folder / self.file_name(step)
        atomic_save(state, path, note=self._resume_note())
        self._prune()
        return path

    def _resume_note(self) -> str:
        """Where the run resumes if this save fails (for the full-disk message)."""
        latest = self.latest()
        if latest is None:
            return "; the run starts again from step 0"
        return f"; the run resumes from step {int(_STEP_FILE.match(latest.name).group(1))} ({latest.name})"

    def _prune(self) -> None:
        for old in self.checkpoints()[: -self.keep_last]:
            _remove(old)

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """One checkpoint, whole; CheckpointError naming the file when it cannot be read. A sharded one is
        read in this process alone into the layout of a `.pt` file (full tensors, the optimiser's state
        by parameter index), which eomt.consolidate writes."""
        path = Path(path)
        if not path.is_dir():
            return load_weights_only(path)
        state = _load_train_state(path)
        content = sharded.read_full(path)
        if "optimizer" in content:
            content["optimizer"] = _optimizer_state_by_index(content["optimizer"])
        return state | content

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its contents, or None when there is none yet.

        Unreadable ones (truncated, garbage, zero-filled, empty) are renamed to `*.corrupt` with a
        warning naming them; CheckpointError when checkpoints exist but none can be read.
        """
        return self._newest_readable(self.load, collective=False)

    def _newest_readable(
        self, read: Callable[[Path], dict[str, Any]], collective: bool
    ) -> tuple[Path, dict[str, Any]] | None:
        """`read` the newest checkpoint; one it cannot read (CheckpointError) is set aside as `*.corrupt`
        with a warning and the previous one is tried. `collective`: every rank calls this and `read`
        raises on all of them alike; rank 0 renames once all have seen the error."""
        found = self.checkpoints()
        for path in reversed(found):
            try:
                return path, read(path)
            except CheckpointError as error:
                if collective:
                    distributed.barrier()
                corrupt = _set_aside(path) if distributed.is_main() or not collective else None
                if collective:
                    corrupt = distributed.broadcast_object(corrupt)
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
        in_dcp = _SHARDED_PARTS if self.sharded else ()
        state = {name: part.state_dict() for name, part in self.parts.items() if name not in in_dcp}
        state.update(self.train_state.state_dict())
        state["rng"] = distributed.all_gather_object(rng_state())
        state["config"] = self.config
        if self.sharded:
            path = self._save_sharded(state, step)
        else:
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

    def _save_sharded(self, state: dict[str, Any], step: int) -> Path:
        """Every rank writes its shards into a temp directory (rank 0 also `train_state.pt`: `state`);
        once all have finished, rank 0 renames it to `step_N/`. A full disk: one DiskFullError on every rank."""
        final = self.folder / self.dir_name(step)
        note, tmp = None, None
        if distributed.is_main():
            note = self._resume_note()
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=self.folder, prefix=f".{final.name}.", suffix=".tmp")
        note, tmp = distributed.broadcast_object((note, tmp))
        tmp = Path(tmp)
        disk_full = None
        if distributed.is_main():
            try:
                atomic_save(state, tmp / sharded.TRAIN_STATE, note=note)
            except DiskFullError as e:
                disk_full = str(e)
        disk_full = distributed.broadcast_object(disk_full)
        if disk_full is None:
            content = sharded.state_of(*self._sharded_parts())
            size = tensor_bytes(content)  # a DTensor counts whole: the size of every rank's shards
            try:  # DCP raises a rank's failure on every rank
                with disk_full_as_one_line(final, size, note):
                    sharded.save(content, tmp)
            except DiskFullError as e:
                disk_full = str(e)
        if disk_full is not None:
            if distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFullError(disk_full)
        distributed.barrier()  # every rank's shards are written
        if distributed.is_main():
            _install(tmp, final)
            self._prune()
        distributed.barrier()
        return final

    def _sharded_parts(self) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
        model = self.parts.get("model")
        if not isinstance(model, nn.Module):
            raise ValueError("a sharded checkpoint needs the model among the parts")
        optimizer = self.parts.get("optimizer")
        return model, [optimizer] if optimizer is not None else []

    def restore_training_state(self) -> Path | None:
        """Put the newest readable checkpoint into the parts, the TrainState and this rank's RNG streams;
        its path, or None when there is none yet (nothing changed). Either kind of checkpoint restores
        into a sharded or a plain model, on any number of ranks."""
        if self.train_state is None:
            raise ValueError("CheckpointManager was built without a train_state: nothing to restore")
        found = self._newest_readable(self._restore_from, collective=True)
        if found is None:
            return None
        path, state = found
        self.train_state.load_state_dict(state)
        rngs, rank = state["rng"], distributed.rank()
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if rank >= len(rngs):  # a rank the saving run did not have: its own streams, drawn from rank 0's
            seed = int(torch.randint(2**31, ())) + rank
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
        self._saved = (self.train_state.step, path)
        return path

    def _restore_from(self, path: Path) -> dict[str, Any]:
        """Load the checkpoint at `path` into the parts; the rest of its content (counters, RNG, config).
        CheckpointError on every rank when it cannot be read (nothing is then half-loaded that a
        previous checkpoint would not overwrite)."""
        error = None
        try:  # each rank checks the files on its own, then all agree, before any collective read
            state = _load_train_state(path) if path.is_dir() else self.load(path)
            if path.is_dir():
                sharded.check_complete(path)
        except CheckpointError as e:
            error = e
        if not distributed.all_true(error is None):
            raise error or CheckpointError(f"{path} cannot be read on another rank")
        in_dcp = _SHARDED_PARTS if path.is_dir() or self.sharded else ()
        if in_dcp:
            model, optimizers = self._sharded_parts()
            if path.is_dir():
                content = sharded.state_of(model, optimizers)
                sharded.load(content, path)
            else:  # a step_N.pt (a run that trained with ddp) into a sharded model: full tensors
                content = {"model": state["model"]}
                if optimizers:
                    content["optimizer"] = _optimizer_state_by_name(model, optimizers[0], state["optimizer"])
            sharded.apply(model, optimizers, content, full=not path.is_dir())
        for name, part in self.parts.items():
            if name not in in_dcp:
                part.load_state_dict(state[name])
        return state


def _load_train_state(path: Path) -> dict[str, Any]:
    try:
        return load_weights_only(path / sharded.TRAIN_STATE)
    except FileNotFoundError as error:
        raise CheckpointError(
            f"{path} has no {sharded.TRAIN_STATE}: its save did not finish, or it was damaged"
        ) from error


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`optimizer.state_dict()` of a plain run (parameters by their index) keyed by parameter names,
    as DCP's state dict API reads it (and names them: without wrappers' prefixes)."""
    groups = sharded.state_of(model, [optimizer])["optimizer"]["param_groups"]
    order = [name for group in groups for name in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def _optimizer_state_by_index(state: dict) -> dict:
    """The inverse: DCP's optimiser state (by parameter name) as `optimizer.state_dict()` gives it."""
    index = {name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final`; a `final` already there (the same step saved
    again) is moved aside first and removed after."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        final.rename(old / final.name)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a checkpoint or a temp; a directory is renamed to a temp name first, so that a kill half-way
    leaves a temp (removed at the next start), never a half-deleted checkpoint."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    doomed = path
    if not path.name.endswith(".tmp"):
        doomed = path.with_name(f".{path.name}.removing.tmp")
        try:
            path.rename(doomed)
        except FileNotFoundError:
            return
    shutil.rmtree(doomed, ignore_errors=True)


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
