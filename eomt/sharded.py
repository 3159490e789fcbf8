"""Sharded checkpoints: a Distributed Checkpoint (DCP) directory, read as safely as our `.pt` files.

A sharded checkpoint `step_N/` holds the model and the optimiser as DCP writes them (`.metadata` plus one
`__<rank>_0.distcp` file per rank that held shards) and `train_state.pt`, everything else the run carries
(counters, every rank's RNG streams, the resolved config, small parts such as the GradScaler), a plain
`torch.save` file. DCP reshards on load, so a checkpoint written by N ranks resumes on any number of ranks,
or is read whole by one process with no process group (`read_full`, what eomt.api and eomt.consolidate use).

The weights-only promise. DCP writes `.metadata` with `pickle` and its non-tensor values (the optimiser's
hyper-parameters) with `torch.save`, and reads them back with `pickle.load` and
`torch.load(weights_only=False)`: either would run code a crafted checkpoint carries. Here `.metadata` is
read by an unpickler that only builds DCP's own metadata classes (`torch.distributed.checkpoint.metadata`),
`torch.Size`, dtypes, layouts and paths, and every value with `torch.load(weights_only=True)`; the tensors
DCP already reads weights-only. Anything else in a checkpoint is refused with one CheckpointError.

DCP takes about a second to import: it is imported when a sharded checkpoint is first read or written, so
that loading a `.pt` file (eomt.api, eomt.predict) does not pay for it.
"""

from __future__ import annotations

import inspect
import io
import pickle
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eomt.errors import CheckpointError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

METADATA = ".metadata"  # DCP's file name for the index of a checkpoint
TRAIN_STATE = "train_state.pt"  # our file next to it: counters, RNG streams, config, small parts

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds DCP's metadata classes, torch.Size and dtypes, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


@cache
def _weights_only_reading() -> tuple[type, type]:
    """DCP's file reader and load planner, with `.metadata` read by the restricted unpickler and
    non-tensor values checked by `torch.load(weights_only=True)` before DCP reads them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            return read_metadata(Path(self.path))

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            torch.load(value, weights_only=True)  # refuses anything but plain values
            value.seek(0)
            super().load_bytes(read_item, value)

    return WeightsOnlyReader, WeightsOnlyPlanner


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a sharded checkpoint directory (ours: DCP's index or our train state in it)."""
    path = Path(path)
    return path.is_dir() and ((path / METADATA).exists() or (path / TRAIN_STATE).exists())


def read_metadata(path: Path) -> Metadata:
    """The index of the checkpoint in `path`, read weights-only; CheckpointError when missing or damaged."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = path / METADATA
    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError as error:
        raise CheckpointError(
            f"{path} has no {METADATA}: its save did not finish, or it was damaged"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{file} is unreadable or not a Distributed Checkpoint index ({type(error).__name__}: {error}); "
            "it may be truncated or damaged"
        ) from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not a Distributed Checkpoint index")
    return metadata


def check_complete(path: Path, metadata: Metadata | None = None) -> Metadata:
    """The index, once every shard file it names is there and long enough; CheckpointError naming the
    first that is not (a missing or truncated shard)."""
    metadata = metadata or read_metadata(path)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        have = file.stat().st_size if file.is_file() else None
        if have is None or have < size:
            state = "missing" if have is None else f"truncated ({have} of {size} bytes)"
            raise CheckpointError(f"{file} is {state}: this sharded checkpoint is incomplete or damaged")
    return metadata


def state_of(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} keyed by parameter names, sharded as the model is (DCP's
    get_state_dict): what `save` writes and `load` reads into."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizers)
    return {"model": model_state} | ({"optimizer": optim_state} if optimizers else {})


def apply(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict[str, Any], full: bool
) -> None:
    """Put `state` (as `state_of` gives; `full`: whole tensors, as a .pt file holds) into the model and
    optimisers, sharding it as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizers,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
        options=StateDictOptions(full_state_dict=True) if full else None,
    )


def save(state: dict[str, Any], path: Path) -> None:
    """Every rank writes its shards of `state` (nested dicts of tensors / DTensors) into `path`; collective.
    A rank's failure is raised on every rank (as DCP does), as that rank's own exception (a full disk:
    its OSError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _one_process_is_intended():
            dcp.save(state, checkpoint_id=path)
    except CheckpointException as error:
        raise _first_failure(error) from error


def load(state: dict[str, Any], path: Path) -> None:
    """Read the checkpoint in `path` into `state` in place (resharding to its tensors); collective when a
    process group is initialised. CheckpointError when the checkpoint is damaged."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    check_complete(path)
    reader, planner = _weights_only_reading()
    try:
        with _one_process_is_intended():
            dcp.load(state, storage_reader=reader(path), planner=planner())
    except (Exception, CheckpointException) as error:  # CheckpointException: a BaseException
        raise CheckpointError(f"{path} cannot be read: {_first_line(_first_failure(error))}") from error


def read_full(path: str | Path, parts: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The whole checkpoint (or its top-level `parts`, e.g. ("model",)) as one nested dict of full
    tensors, read in this process alone (no process group needed, none used)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    metadata = check_complete(path)
    where = metadata.planner_data or {}
    flat: dict[str, Any] = {}
    for key, item in metadata.state_dict_metadata.items():
        route = where.get(key, (key,))
        if parts is not None and route[0] not in parts:
            continue
        is_tensor = isinstance(item, TensorStorageMetadata)
        flat[key] = torch.empty(item.size, dtype=item.properties.dtype) if is_tensor else None
    if parts is not None and not flat:
        raise CheckpointError(f"{path} holds none of {', '.join(parts)}")
    reader, planner = _weights_only_reading()
    try:
        with _one_process_is_intended():
            dcp.load(
                flat,
                storage_reader=reader(path),
                planner=planner(flatten_state_dict=False, flatten_sharded_tensors=False),
                **_in_this_process_alone(dcp.load),
            )
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"{path} cannot be read: {_first_line(_first_failure(error))}") from error
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        _set(nested, where.get(key, (key,)), value)
    return nested


def _in_this_process_alone(load: Any) -> dict[str, bool]:
    """`no_dist=True` where DCP's load takes it (newer torch); older ones read alone when no process group
    is initialised, and collectively otherwise."""
    return {"no_dist": True} if "no_dist" in inspect.signature(load).parameters else {}


def _set(nested: dict, route: tuple, value: Any) -> None:
    """nested[route[0]][route[1]]... = value, making the dicts and lists (int keys) on the way."""
    node: Any = nested
    for key, following in zip(route[:-1], route[1:], strict=True):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = [] if isinstance(following, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(following, int) else {})
    if isinstance(node, list):
        node.extend([None] * (route[-1] + 1 - len(node)))
    node[route[-1]] = value


@contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """Without a process group DCP reads and writes in this process alone, as meant here: no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is .*uninitialized", category=UserWarning
        )
        yield


def _first_failure(error: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (`failures`: rank -> (exception,
    traceback)); any other error as it is."""
    for failure in (getattr(error, "failures", None) or {}).values():
        failure = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(failure, BaseException):
            return failure
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def model_state(path: str | Path) -> Mapping[str, torch.Tensor]:
    """The model's full state dict from a sharded checkpoint, read in this process alone."""
    return read_full(path, parts=("model",))["model"]
