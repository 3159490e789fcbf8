"""Sharded checkpoints (trainer.strategy=fsdp): DCP directories written as safely as our .pt files, read
weights-only, resumed on another number of ranks, read whole without a process group."""

import io
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from eomt import sharded
from eomt.checkpointing import CheckpointManager, TrainState
from eomt.errors import CheckpointError, user_errors

ROOT = Path(__file__).resolve().parents[1]


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _manager(folder, model, optimizer, state=None, sharded=True, **kwargs) -> CheckpointManager:
    return CheckpointManager(
        folder,
        train_state=state or TrainState(),
        parts={"model": model, "optimizer": optimizer, "scaler": torch.amp.GradScaler(enabled=False)},
        config={"trainer": {"strategy": "fsdp" if sharded else "ddp"}},
        sharded=sharded,
        **kwargs,
    )


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_sharded_checkpoint_is_a_directory_that_restores_everything(tmp_path):
    model, optimizer = _parts(0)
    saver = _manager(tmp_path, model, optimizer, TrainState(step=3, skipped_steps=1), keep_last=2)
    for step in (1, 2, 3):
        saver.save_training_state(step)
    assert [p.name for p in saver.checkpoints()] == ["step_00000002", "step_00000003"]  # kept the last 2
    newest = saver.latest()
    assert {p.name for p in newest.iterdir()} == {".metadata", "__0_0.distcp", sharded.TRAIN_STATE}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind
    expected_draw = torch.rand(3)

    fresh_model, fresh_optimizer = _parts(1)
    fresh_state = TrainState()
    assert _manager(tmp_path, fresh_model, fresh_optimizer, fresh_state).restore_training_state() == newest
    assert fresh_state.state_dict() == {"step": 3, "skipped_steps": 1}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG streams continue
    assert _equal_states(model, fresh_model)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])

    whole = CheckpointManager.load(newest)  # read whole, as a .pt file is
    assert whole["step"] == 3 and whole["config"] == {"trainer": {"strategy": "fsdp"}}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in whole["model"].items())
    assert whole["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_files_and_directories_are_one_sequence_and_either_restores_into_either(tmp_path):
    """A run that switches strategy resumes from the other kind of checkpoint."""
    model, optimizer = _parts(0)
    plain = _manager(tmp_path, model, optimizer, TrainState(step=1), sharded=False)
    plain.save_training_state(1)
    fresh_model, fresh_optimizer = _parts(1)
    assert (
        _manager(tmp_path, fresh_model, fresh_optimizer).restore_training_state().name == "step_00000001.pt"
    )
    assert _equal_states(model, fresh_model)
    assert torch.equal(
        optimizer.state[model[0].weight]["exp_avg"], fresh_optimizer.state[fresh_model[0].weight]["exp_avg"]
    )

    _manager(tmp_path, model, optimizer, TrainState(step=2)).save_training_state(2)
    assert [p.name for p in plain.checkpoints()] == ["step_00000001.pt", "step_00000002"]
    other_model, other_optimizer = _parts(2)
    back = _manager(tmp_path, other_model, other_optimizer, sharded=False)
    assert back.restore_training_state().name == "step_00000002"
    assert _equal_states(model, other_model)


def _damage(path: Path, how: str) -> None:
    shard = path / "__0_0.distcp"
    if how == "no metadata":
        (path / ".metadata").unlink()
    elif how == "truncated metadata":
        (path / ".metadata").write_bytes((path / ".metadata").read_bytes()[:100])
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-50])
    elif how == "no shard":
        shard.unlink()
    elif how == "no train state":
        (path / sharded.TRAIN_STATE).unlink()


@pytest.mark.parametrize(
    "how", ["no metadata", "truncated metadata", "truncated shard", "no shard", "no train state"]
)
def test_a_damaged_newest_sharded_checkpoint_falls_back_with_a_warning(tmp_path, how, caplog):
    model, optimizer = _parts(0)
    saver = _manager(tmp_path, model, optimizer, TrainState(step=1))
    saver.save_training_state(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    saver.train_state.step = 2
    saver.save_training_state(2)
    _damage(tmp_path / "step_00000002", how)

    fresh_model, fresh_optimizer = _parts(1)
    fresh_state = TrainState()
    with caplog.at_level(logging.WARNING, logger="eomt.checkpointing"):
        path = _manager(tmp_path, fresh_model, fresh_optimizer, fresh_state).restore_training_state()
    assert path.name == "step_00000001" and fresh_state.step == 1
    assert all(torch.equal(v, fresh_model.state_dict()[k]) for k, v in saved.items())
    assert "step_00000002" in caplog.text and "step_00000002.corrupt" in caplog.text
    assert (tmp_path / "step_00000002.corrupt").is_dir()  # kept for a look
    with pytest.raises(CheckpointError):
        CheckpointManager.load(tmp_path / "step_00000002.corrupt")


def test_a_step_saved_again_replaces_its_directory(tmp_path):
    """A run started again with trainer.resume=never saves the same steps again."""
    model, optimizer = _parts(0)
    _manager(tmp_path, model, optimizer, TrainState(step=1)).save_training_state(1)
    other, other_optimizer = _parts(1)
    _manager(tmp_path, other, other_optimizer, TrainState(step=1)).save_training_state(1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no temp left
    whole = CheckpointManager.load(tmp_path / "step_00000001")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in whole["model"].items())


def test_start_removes_interrupted_sharded_writes_but_readers_leave_them(tmp_path):
    leftover = tmp_path / ".step_00000004.k2j3.tmp"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"half")
    CheckpointManager(tmp_path, clean_up=False)
    assert leftover.exists()
    CheckpointManager(tmp_path)
    assert not leftover.exists()


_MID_SAVE = """
import sys, time, torch
from torch.distributed.checkpoint import FileSystemWriter
from eomt.checkpointing import CheckpointManager, TrainState

real_write = FileSystemWriter.write_data
def slow_write(self, plan, planner):
    print("writing", flush=True)
    time.sleep(60)  # killed here, half-way through the save
    return real_write(self, plan, planner)

torch.manual_seed(0)
model = torch.nn.Linear(64, 64)
manager = CheckpointManager(sys.argv[1], train_state=TrainState(step=1), parts={"model": model}, sharded=True)
manager.save_training_state(1)
FileSystemWriter.write_data = slow_write
with torch.no_grad():
    model.weight.zero_()
manager.train_state.step = 2
manager.save_training_state(2)
"""


def test_kill_9_during_a_sharded_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    folder = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-c", _MID_SAVE, str(folder)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing", "the save did not start"
        temps = [p for p in folder.iterdir() if p.name.startswith(".step_00000002.")]
        assert len(temps) == 1 and (temps[0] / sharded.TRAIN_STATE).exists()  # half-way: state, no shards
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    torch.manual_seed(0)
    expected = torch.nn.Linear(64, 64)
    model = torch.nn.Linear(64, 64)
    manager = CheckpointManager(folder, train_state=TrainState(), parts={"model": model}, sharded=True)
    assert not temps[0].exists()  # the start removed the interrupted write
    assert manager.restore_training_state() == folder / "step_00000001"
    assert _equal_states(expected, model)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_carries_code_is_refused_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, optimizer = _parts(0)
    _manager(tmp_path / "ckpt", model, optimizer, TrainState(step=1)).save_training_state(1)
    path = tmp_path / "ckpt" / "step_00000001"
    metadata = sharded.read_metadata(path)
    metadata.storage_meta = _Boom()  # what a crafted .metadata would unpickle
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(
        CheckpointError, match=r"\.metadata is unreadable .*Unsupported global: GLOBAL posix\.system"
    ):
        sharded.read_full(path)
    crafted = io.BytesIO()
    torch.save(
        {"lr": _Boom()}, crafted
    )  # a crafted non-tensor value (DCP reads those with weights_only=False)
    crafted.seek(0)
    _, planner = sharded._weights_only_reading()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        planner().load_bytes(None, crafted)
    assert not (tmp_path / "PWNED").exists()


# --- resume on another number of ranks (FSDP2 over gloo) -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(step: int) -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(step))


def _tiny_eomt():
    from eomt.model import EoMT

    backbone = dict(embed_dim=64, depth=4, num_heads=2)
    return EoMT(
        "vit_small_patch14_reg4_dinov2",
        img_size=(64, 64),
        num_classes=5,
        num_queries=7,
        num_blocks=2,
        masked_attn=False,
        backbone_kwargs=backbone,
    )


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
        for k, v in model.state_dict().items()
    }


def _train(rank: int, world: int, folder: str, steps: tuple[int, int]) -> dict:
    """A tiny EoMT, each block then the root sharded over the `world` ranks of the process group: restore
    the newest checkpoint (if any), train steps[0] to steps[1] (the batch split over the ranks), saving
    after each step."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(100 + world)  # another init than the saving run's: only the checkpoint can match
    model = _tiny_eomt()
    for block in model.backbone.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = TrainState()
    parts = {"model": model, "optimizer": optimizer}
    manager = CheckpointManager(folder, keep_last=10, train_state=state, parts=parts, sharded=True)
    manager.restore_training_state()
    assert state.step == steps[0], (state.step, steps)
    draws = [None] * world
    torch.distributed.all_gather_object(draws, torch.rand(()).item())  # each rank's next random number
    record = {"restored": _full(model), "losses": [], "weights": {}, "draws": draws}
    for step in range(*steps):
        masks, classes = model(_batch(step).chunk(world)[rank])
        loss = masks[-1].square().mean() + classes[-1].logsumexp(-1).mean()
        loss.backward()  # FSDP averages the gradients over the ranks: the whole batch's mean
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        record["losses"].append(total.item() / world)
        state.step = step + 1
        manager.save_training_state(state.step)
        record["weights"][state.step] = _full(model)
    return record


def _rank(rank: int, world: int, port: int, folder: str, steps: tuple[int, int], out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    record = _train(rank, world, folder, steps)
    if rank == 0:
        torch.save(record, out)
    torch.distributed.destroy_process_group()


def _two_ranks(folder: Path, steps: tuple[int, int], out: Path) -> dict:
    mp.spawn(_rank, args=(2, _free_port(), str(folder), steps, str(out)), nprocs=2)
    return torch.load(out, weights_only=True)


def _one_rank(folder: Path, steps: tuple[int, int]) -> dict:
    """Here, in a process group of one (fully_shard needs one)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        return _train(0, 1, str(folder), steps)
    finally:
        torch.distributed.destroy_process_group()


def _close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor")  # as eomt.parallel.shard
def test_resume_on_another_number_of_ranks_gives_the_same_weights_and_next_loss(tmp_path):
    """1 rank trains 4 steps uninterrupted; 2 ranks resume its step 2 for one step, 1 rank resumes
    that for the last: the same weights on restore (exactly), the same losses and end weights."""
    whole = _one_rank(tmp_path / "whole", (0, 4))
    shutil.copytree(tmp_path / "whole" / "step_00000002", tmp_path / "resumed" / "step_00000002")
    two = _two_ranks(tmp_path / "resumed", (2, 3), tmp_path / "two.pt")  # 1 -> 2
    one = _one_rank(tmp_path / "resumed", (3, 4))  # 2 -> 1
    assert all(torch.equal(v, whole["weights"][2][k]) for k, v in two["restored"].items())
    assert all(torch.equal(v, two["weights"][3][k]) for k, v in one["restored"].items())
    assert two["losses"] == pytest.approx(whole["losses"][2:3], rel=1e-5)
    assert one["losses"] == pytest.approx(whole["losses"][3:4], rel=1e-5)
    assert two["draws"][1] != two["draws"][0]  # the rank the 1-rank run lacked draws a stream of its own
    assert _close(one["weights"][4], whole["weights"][4])
    assert {p.name for p in (tmp_path / "resumed" / "step_00000003").iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",  # written by two ranks
        sharded.TRAIN_STATE,
    }


# --- readers: eomt.api, eomt.predict, eomt.export, eomt.consolidate -----------------------------------
@pytest.fixture
def sharded_run(tmp_path):
    """A run directory as an fsdp run leaves it: config.yaml and a sharded checkpoint of its network."""
    from eomt.config import compose
    from eomt.model import build_model
    from eomt.run_info import write_run_info

    cfg = compose(["experiment=demo", "model.num_queries=9", "model.num_blocks=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    write_run_info(cfg, run)
    config = OmegaConf.to_container(cfg, resolve=True)
    manager = CheckpointManager(
        run / "checkpoints",
        train_state=TrainState(step=5),
        parts={"model": model, "optimizer": optimizer},
        config=config,
        sharded=True,
    )
    manager.save_training_state(5)
    return run, model


def test_every_reader_takes_a_sharded_checkpoint_or_its_run_directory(sharded_run, tmp_path):
    from eomt import api, predict
    from eomt.checkpoint_config import compose_for
    from eomt.export import build_metadata

    run, trained = sharded_run
    step = run / "checkpoints" / "step_00000005"
    elsewhere = tmp_path / "copied_step"  # outside its run: the config it carries builds the network
    shutil.copytree(step, elsewhere)
    for checkpoint in (run, step, elsewhere):
        loaded = api.load(checkpoint=str(checkpoint))
        assert loaded.num_queries == 9 and loaded.num_blocks == 3
        assert _equal_states(trained, loaded)
    args, overrides = predict.parse_args([f"checkpoint={elsewhere}", "input=x", "output=y"])
    network, cfg = predict.load_network(args, overrides, torch.device("cpu"))
    assert _equal_states(trained, network) and cfg.dataset.name == "synthetic"
    assert build_metadata(compose_for([], elsewhere), elsewhere, "float32").config_source == "checkpoint"


def test_consolidate_writes_one_weights_only_file_that_resumes_and_loads(sharded_run, capsys):
    from eomt import api
    from eomt.consolidate import main

    run, trained = sharded_run
    main([str(run)])
    out = run / "step_00000005.pt"
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    state = torch.load(out, weights_only=True)
    assert state["step"] == 5 and state["config"]["model"]["num_queries"] == 9
    assert _equal_states(trained, api.load(checkpoint=str(out)))

    model = api.load(checkpoint=str(out)).train()  # a plain (ddp) run resumes from it
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    (run / "plain").mkdir()
    shutil.copy(out, run / "plain" / out.name)
    resumed = CheckpointManager(
        run / "plain", train_state=TrainState(), parts={"model": model, "optimizer": optimizer}
    )
    assert resumed.restore_training_state() == run / "plain" / out.name
    assert optimizer.state_dict()["param_groups"][0]["params"] == list(range(len(list(trained.parameters()))))


@pytest.mark.parametrize(
    ("target", "words"),
    [("file.pt", "is a single-file checkpoint already"), (".", "is not a sharded checkpoint")],
)
def test_consolidate_names_what_is_wrong_in_one_line(tmp_path, capsys, target, words):
    from eomt.consolidate import main

    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_, user_errors():
        main([str(tmp_path / target)])
    message = capsys.readouterr().err
    assert exit_.value.code == 1 and words in message and message.count("\n") == 1, message


# --- end to end through train.py: two fsdp ranks save, one resumes ----------------------------------------
TRAIN = [
    "experiment=demo",
    "trainer.strategy=fsdp",
    "trainer.compile=false",
    "trainer.num_workers=0",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.log_every_steps=1",
    "trainer.ckpt_every_steps=2",
    "eval.every_epochs=0",
    "loss.num_points=64",
]


def _train_rank(rank: int, port: int, run_dir: str, cache: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["EOMT_CACHE"] = cache
    torch.set_num_threads(1)
    import train
    from eomt.config import compose

    run = train.build_run(compose([*TRAIN, "trainer.max_steps=2"]), Path(run_dir))
    train.train(run)
    state = {k: v.clone() for k, v in run.evaluated().state_dict().items()}  # gathered on every rank
    if rank == 0:
        torch.save(state, Path(run_dir, "weights.pt"))
    train.distributed.cleanup()


@pytest.mark.slow
def test_train_py_resumes_two_fsdp_ranks_checkpoint_on_one(tmp_path, tmp_path_factory, caplog):
    import train
    from eomt.config import compose

    cache = os.environ.get("EOMT_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    two = tmp_path / "two"
    mp.spawn(_train_rank, args=(_free_port(), str(two), cache), nprocs=2)
    step = two / "checkpoints" / "step_00000002"
    assert {p.name for p in step.iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    saved = torch.load(two / "weights.pt", weights_only=True)

    one = tmp_path / "one"
    shutil.copytree(step, one / "checkpoints" / step.name)
    os.environ.setdefault("EOMT_CACHE", cache)
    run = train.build_run(compose([*TRAIN, "trainer.max_steps=3"]), one)
    try:
        assert run.checkpoints.restore_training_state() == one / "checkpoints" / step.name
        restored = run.evaluated().state_dict()
        assert all(torch.equal(restored[k], v) for k, v in saved.items())  # the same weights on 1 rank
        with caplog.at_level(logging.INFO):
            train.train(run)
    finally:
        train.distributed.cleanup()
    assert f"resumed from {one / 'checkpoints' / step.name} at step 2" in caplog.text
    assert {p.name for p in (one / "checkpoints" / "step_00000003").iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        sharded.TRAIN_STATE,
    }


def test_a_full_disk_during_a_sharded_save_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys):
    import errno
    from contextlib import contextmanager

    from torch.distributed.checkpoint import filesystem

    model, optimizer = _parts(0)
    manager = _manager(tmp_path, model, optimizer, TrainState(step=1))
    manager.save_training_state(1)

    @contextmanager
    def full_disk(self, path, mode):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", full_disk)
    manager.train_state.step = 2
    with pytest.raises(SystemExit), user_errors():
        manager.save_training_state(2)
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message
    assert f"no space left on the device of {tmp_path}: could not write step_00000002 (" in message
    assert "resumes from step 1 (step_00000001)" in message
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no temp directory left
