"""Complete, atomic training checkpoints and the resume lookup.

A run directory holds `checkpoints/step_00001234.pt` files. A file only ever appears under its
final name once it is completely written (temp file + `os.replace`), so the newest one is always
safe to resume from, even after a hard kill.
"""

from __future__ import annotations

import ast
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eomt import model_zoo
from eomt.atomic import atomic_open

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename over `path`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


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
    """Writes `step_N.pt` files into `folder`, keeps the newest `keep_last`, finds the latest."""

    def __init__(self, folder: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        files = self.checkpoints()
        return files[-1] if files else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.folder / f"step_{step:08d}.pt"
        atomic_save(state, path)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which and what to do
            reason = (str(e).splitlines() or [""])[0][:200]
            raise RuntimeError(
                f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); delete it to resume from the "
                "previous one, or set trainer.resume=never"
            ) from e


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or Transformers folder as given; a run directory -> its newest checkpoint;
    a hub name (tue-mps/<repo>, hf://<org>/<repo>) -> its weights in the Hugging Face cache."""
    if model_zoo.hub_repo(path) is not None:
        return model_zoo.download(path)
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a training run directory
        latest = CheckpointManager(path / "checkpoints").latest()
        if latest is None:
            raise SystemExit(f"error: run directory {path} has no checkpoint yet; train it first")
        return latest
    if not path.exists():
        raise SystemExit(f"error: checkpoint={path} does not exist")
    return path
