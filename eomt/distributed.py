"""Where this process sits in a distributed run: torchrun, SLURM (srun / submitit), or alone.

`detect()` reads the environment only; `init()` joins the process group. Every helper here is a
no-op in a single process, so the training loop calls them unconditionally.

Order of precedence in `detect()`:
1. torchrun (or any launcher that exports `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`);
2. a SLURM job step started by `srun` with more than one task (also how submitit's SLURM executor
   starts tasks): ranks from `SLURM_PROCID` / `SLURM_LOCALID`, world size from the step's task
   count, master = first host of the step's node list, port derived from the job id;
3. submitit's local executor with `tasks_per_node > 1`;
4. a single process. An sbatch batch shell is a single process even when the allocation has many
   tasks: only `srun` starts the other ranks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

# Slurm's reserved step ids (batch script, extern, interactive, pending steps) are all >= this.
_SPECIAL_STEP_IDS = 0xFFFFFFF0
_PORT_BASE, _PORT_RANGE = 10000, 20000

_env: DistEnv | None = None


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run. `launcher` is "torchrun", "slurm", "submitit_local" or "single"."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: "gpu[01-03,07],cpu5" -> [gpu01, gpu02, gpu03, gpu07, cpu5].

    Ranges keep their zero padding; several bracket groups in one name expand as a product
    ("n[1-2]-ib[0-1]" -> n1-ib0, n1-ib1, n2-ib0, n2-ib1).
    """
    groups = re.findall(r"(?:[^,\[\]]|\[[^\]\[]*\])+", nodelist)
    if ",".join(groups) != nodelist:
        raise ValueError(f"cannot parse the SLURM node list {nodelist!r}; expected e.g. 'gpu[01-03,07]'")
    hosts: list[str] = []
    for group in groups:
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            suffixes = [literal + s for s in _expand_ranges(ranges, nodelist)] if ranges else [literal]
            names = [n + s for n in names for s in suffixes]
        hosts.extend(names)
    if not hosts or any(not h for h in hosts):
        raise ValueError(f"cannot parse the SLURM node list {nodelist!r}; expected e.g. 'gpu[01-03,07]'")
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"cannot parse the SLURM node list {nodelist!r}: bad range {part!r}")
        if not sep:
            out.append(low)
            continue
        out.extend(f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1))
    return out


def _port_from_job_id(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id) or "0"
    return _PORT_BASE + int(digits) % _PORT_RANGE


def _is_srun_task(environ: Mapping[str, str]) -> bool:
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    return "SLURM_PROCID" in environ and step is not None and step.isdigit() and int(step) < _SPECIAL_STEP_IDS


def detect(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read rank, local rank, world size and the rendezvous address from `environ` (see module doc)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=int(environ["WORLD_SIZE"]),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if _is_srun_task(environ):
        world = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", 1)))
        if world > 1:
            nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise RuntimeError(
                    "SLURM step with several tasks but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST"
                )
            return DistEnv(
                rank=int(environ["SLURM_PROCID"]),
                local_rank=int(environ.get("SLURM_LOCALID", 0)),
                world_size=world,
                master_addr=environ.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
                master_port=int(
                    environ.get("MASTER_PORT") or _port_from_job_id(environ.get("SLURM_JOB_ID", "0"))
                ),
                launcher="slurm",
            )
    if environ.get("SUBMITIT_EXECUTOR") == "local" and int(environ.get("SUBMITIT_LOCAL_NTASKS", 1)) > 1:
        return DistEnv(
            rank=int(environ["SUBMITIT_LOCAL_GLOBALID"]),
            local_rank=int(environ["SUBMITIT_LOCAL_LOCALID"]),
            world_size=int(environ["SUBMITIT_LOCAL_NTASKS"]),
            master_addr="127.0.0.1",
            master_port=_port_from_job_id(environ.get("SUBMITIT_LOCAL_JOB_ID", "0")),
            launcher="submitit_local",
        )
    return DistEnv()


def init(device: str, group_of_one: bool = False) -> DistEnv:
    """Join the process group when the environment describes several ranks, and pick this rank's GPU.

    `device` is "cuda" (NCCL, `torch.cuda.set_device(local_rank)`) or "cpu" (gloo). Exports
    MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK so libraries that read them agree.
    `group_of_one`: a single process makes a group of its own too (in memory, no port), for what needs
    one even alone (FSDP's device mesh). Safe to call again in the same process (returns the same DistEnv).
    """
    global _env
    if _env is not None and is_initialized():
        return _env
    env = detect()
    cuda = device.startswith("cuda")
    if cuda and torch.cuda.is_available():
        # With one GPU visible per task (e.g. --gpus-per-task=1) every local rank uses device 0.
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not env.is_distributed and group_of_one and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not env.is_distributed:
        nominal = os.environ.get("SLURM_NTASKS", "1")
        if "SLURM_JOB_ID" in os.environ and nominal.isdigit() and int(nominal) > 1:
            log.warning(
                "the SLURM allocation has %s tasks but this process was not started by srun: running as "
                "one process; launch with `srun python train.py ...` for DDP",
                nominal,
            )
        _env = env
        return env
    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR=env.master_addr,
            MASTER_PORT=str(env.master_port),
            RANK=str(env.rank),
            WORLD_SIZE=str(env.world_size),
            LOCAL_RANK=str(env.local_rank),
        )
        dist.init_process_group("nccl" if cuda else "gloo", rank=env.rank, world_size=env.world_size)
        log.info(
            "rank %d/%d joined via %s at %s:%d",
            env.rank,
            env.world_size,
            env.launcher,
            env.master_addr,
            env.master_port,
        )
    _env = env
    return env


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _collective_device() -> torch.device:
    """NCCL only moves CUDA tensors, gloo only CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (it must live on the collective's device) and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: float) -> float:
    """The largest `value` over all ranks."""
    if not is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_true(flag: bool | torch.Tensor) -> bool:
    """True only if `flag` is true on every rank. A tensor flag stays on its device until this one read."""
    if not is_initialized():
        return bool(flag)
    t = torch.as_tensor(flag).to(_collective_device(), torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t > 0.5)


def sum_across_ranks(array: np.ndarray) -> np.ndarray:
    """Element-wise sum of a numpy array over all ranks (dtype kept)."""
    if not is_initialized():
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_collective_device())
    return all_reduce_sum_(tensor).cpu().numpy()


def gather_to_main(obj: Any) -> list[Any] | None:
    """`[obj of rank 0, obj of rank 1, ...]` on rank 0, None elsewhere (lighter than gathering everywhere)."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (must be picklable)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_replicas(module: torch.nn.Module) -> bool:
    """Compare every rank's parameters and buffers bit for bit (DDP keeps them equal); log the outcome on rank 0.

    Sharded tensors (DTensors: FSDP's parameters) have one copy, split over the ranks: they are left out
    and the log says how many; what is replicated (buffers, any unsharded parameter) is compared.
    Collective: every rank calls it. Returns True when all ranks agree (always in a single process).
    """
    if not is_initialized():
        return True
    digest, sharded = hashlib.sha256(), 0
    for name, tensor in module.state_dict().items():
        if isinstance(tensor, DTensor):
            sharded += 1
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = all_gather_object(digest.hexdigest())
    agree = len(set(digests)) == 1
    what = f"replicated tensors ({sharded} sharded ones not compared)" if sharded else "parameters"
    if is_main():
        if agree:
            log.info("%s identical on all %d ranks (sha256 %s)", what, len(digests), digests[0][:16])
        else:
            log.warning("%s DIFFER across ranks: %s", what, ", ".join(d[:16] for d in digests))
    return agree


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    global _env
    if is_initialized():
        dist.destroy_process_group()
    _env = None
