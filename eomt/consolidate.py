"""Write one `.pt` file from a sharded checkpoint (trainer.strategy=fsdp), with no process group.

    python -m eomt.consolidate outputs/my_run                                  # its newest checkpoint
    python -m eomt.consolidate outputs/my_run/checkpoints/step_00001000 model.pt

The file has the layout of the `step_N.pt` files a ddp run writes (weights, optimiser state by parameter
index, counters, RNG streams, config) and loads with `torch.load(weights_only=True)`: eomt.api, evaluate.py,
eomt.predict, eomt.export and `trainer.init_from` read it, and a run resumes from it when it is put in
its `checkpoints/` folder. By default it goes into the run directory, `<run>/step_N.pt` (outside
`checkpoints/`, so that it is not taken for a checkpoint of the run). Every part is read whole into memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from eomt import sharded
from eomt.checkpointing import CheckpointManager, atomic_save
from eomt.errors import CheckpointError, user_errors


def sharded_checkpoint(path: str | Path) -> Path:
    """The sharded checkpoint directory `path` names: itself, or a run directory's newest checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path / "checkpoints", clean_up=False).latest()
        if latest is None:
            raise CheckpointError(f"run directory {path} has no checkpoint yet; train it first")
        path = latest
    if path.is_file():
        raise CheckpointError(f"{path} is a single-file checkpoint already: use it as it is")
    if not sharded.is_sharded(path):
        raise CheckpointError(
            f"{path} is not a sharded checkpoint (a step_N/ directory of a trainer.strategy=fsdp run) "
            "nor a run directory holding one; fix the path"
        )
    return path


def default_output(checkpoint: Path) -> Path:
    folder = checkpoint.parent
    return (folder.parent if folder.name == "checkpoints" else folder) / f"{checkpoint.name}.pt"


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the sharded checkpoint at `path` (or a run directory's newest) as one file; its path."""
    checkpoint = sharded_checkpoint(path)
    out = Path(out) if out is not None else default_output(checkpoint)
    atomic_save(CheckpointManager.load(checkpoint), out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eomt.consolidate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a sharded step_N/ directory, or a run directory (its newest)")
    parser.add_argument("out", nargs="?", help="the .pt file to write (default: <run>/step_N.pt)")
    args = parser.parse_args(argv)
    out = consolidate(args.checkpoint, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    with user_errors():
        main()
