"""Rank / world / rendezvous detection from torchrun and SLURM environments, and real gloo collectives."""

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eomt import distributed
from eomt.distributed import DistEnv, detect, expand_nodelist


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("n[1-2]-ib[0-1]", ["n1-ib0", "n1-ib1", "n2-ib0", "n2-ib1"]),
        ("dgx-[5,3]", ["dgx-5", "dgx-3"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "gpu[01-", "gpu[a-b]", "x,,y", "gpu]", "gpu[1-2"])
def test_expand_nodelist_rejects_malformed_lists(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_nodelist(bad)


def slurm_step(
    procid: int, localid: int, ntasks: int, nodelist: str, job_id: str = "123456"
) -> dict[str, str]:
    """What srun exports to each task of a job step."""
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }


def test_single_process_without_launcher():
    assert detect({}) == DistEnv(rank=0, local_rank=0, world_size=1, launcher="single")
    assert not detect({}).is_distributed


def test_torchrun_variables():
    env = detect(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29511"}
    )
    assert env == DistEnv(3, 1, 4, "10.0.0.2", 29511, "torchrun")


def test_torchrun_wins_over_the_surrounding_slurm_step():
    environ = {**slurm_step(0, 0, 1, "gpu01"), "RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4"}
    env = detect(environ)
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 2, 4)


def test_slurm_single_node_four_tasks():
    env = detect(slurm_step(procid=2, localid=2, ntasks=4, nodelist="gpu17", job_id="987654"))
    assert env == DistEnv(
        rank=2,
        local_rank=2,
        world_size=4,
        master_addr="gpu17",
        master_port=10000 + 987654 % 20000,
        launcher="slurm",
    )


def test_slurm_multi_node_master_is_the_first_host_of_the_step():
    environ = slurm_step(procid=13, localid=1, ntasks=16, nodelist="gpu[01-03,07]", job_id="42")
    env = detect(environ)
    assert (env.rank, env.local_rank, env.world_size) == (13, 1, 16)
    assert env.master_addr == "gpu01"
    assert env.master_port == 10042
    # every task of the job computes the same rendezvous
    other = detect(slurm_step(procid=0, localid=0, ntasks=16, nodelist="gpu[01-03,07]", job_id="42"))
    assert (other.master_addr, other.master_port) == (env.master_addr, env.master_port)


def test_slurm_explicit_master_port_is_kept():
    env = detect({**slurm_step(1, 1, 2, "gpu[01-02]"), "MASTER_PORT": "31000", "MASTER_ADDR": "10.1.1.1"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 31000)


def test_sbatch_batch_shell_is_one_process_even_with_many_tasks_allocated():
    # The batch script runs outside any srun step: SLURM_NTASKS describes the allocation, not this process.
    environ = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
    }
    assert detect(environ).world_size == 1
    batch_step = {**environ, "SLURM_STEP_ID": str(0xFFFFFFFB)}  # Slurm's id for the batch step
    assert detect(batch_step).world_size == 1


def test_srun_step_with_one_task_is_one_process():
    assert detect(slurm_step(0, 0, 1, "gpu01")) == DistEnv()


def test_submitit_local_tasks():
    environ = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "31337",
    }
    env = detect(environ)
    assert (env.rank, env.world_size, env.master_addr, env.launcher) == (1, 2, "127.0.0.1", "submitit_local")
    assert env.master_port == 10000 + 31337 % 20000


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SUBMITIT_EXECUTOR", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init("cpu") == DistEnv()
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.tensor([2.0])
    assert distributed.all_reduce_sum_(t) is t and t.item() == 2.0
    assert distributed.all_gather_object("x") == ["x"]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.all_true(torch.tensor(True)) and not distributed.all_true(torch.tensor(False))
    distributed.barrier()
    distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(slurm_step(rank, rank, world, "localhost"), MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = distributed.init("cpu")
    value = distributed.all_reduce_sum_(torch.tensor([float(rank + 1)]))
    result = {
        "env": env,
        "again": distributed.init("cpu"),
        "rank": distributed.rank(),
        "world": distributed.world_size(),
        "main": distributed.is_main(),
        "sum": value.item(),
        "gathered": distributed.all_gather_object(f"r{rank}"),
        "broadcast": distributed.broadcast_object({"from": rank}),
        "all_true": distributed.all_true(rank == 0),
        "all_true_tensor": distributed.all_true(torch.tensor(rank >= 0)),
        "max": distributed.all_reduce_max(float(rank * 10)),
    }
    distributed.barrier()
    distributed.cleanup()
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_from_a_slurm_step_join_over_gloo(tmp_path):
    mp.spawn(_slurm_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["env"].launcher == "slurm" and res["env"].rank == rank and res["env"].world_size == 2
        assert res["again"] == res["env"]  # a second init keeps the group and says the same
        assert (res["rank"], res["world"], res["main"]) == (rank, 2, rank == 0)
        assert res["sum"] == 3.0
        assert res["gathered"] == ["r0", "r1"]
        assert res["broadcast"] == {"from": 0}
        assert (res["all_true"], res["all_true_tensor"], res["max"]) == (False, True, 10.0)


def _replica_rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    same = distributed.check_replicas(model)
    with torch.no_grad():
        model.bias[0] += rank * 1e-6  # one rank drifts
    drifted = distributed.check_replicas(model)
    torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(f"{same} {drifted}")


def test_check_replicas_tells_identical_from_drifted_parameters(tmp_path):
    assert distributed.check_replicas(torch.nn.Linear(3, 2))  # a single process agrees with itself
    mp.spawn(_replica_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["True False"] * 2
