import errno
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from eomt.atomic import write_json
from eomt.checkpointing import CheckpointManager, TrainState, atomic_save, rng_state, set_rng_state
from eomt.errors import CheckpointError, DiskFullError, user_errors


def test_keeps_last_k_and_finds_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.latest() is None
    for step in (5, 10, 100):
        manager.save({"step": step, "w": torch.full((2,), float(step))}, step)
    names = [p.name for p in manager.checkpoints()]
    assert names == ["step_00000010.pt", "step_00000100.pt"]
    state = CheckpointManager.load(manager.latest())
    assert state["step"] == 100 and torch.equal(state["w"], torch.full((2,), 100.0))


def test_atomic_save_leaves_no_partial_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    target = tmp_path / "step_00000001.pt"
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"bad": Unpicklable()}, target)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_names_file(tmp_path):
    bad = tmp_path / "step_00000003.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"step_00000003\.pt is unreadable or not a PyTorch checkpoint"):
        CheckpointManager.load(bad)


def test_start_removes_temp_files_of_interrupted_writes(tmp_path):
    folder = tmp_path / "ckpt"
    CheckpointManager(folder).save({"step": 1}, 1)
    leftover = folder / ".step_00000002.pt.abc123.tmp"  # eomt.atomic's name for a write in progress
    leftover.write_bytes(b"half a checkpoint")
    other = folder / "notes.tmp"
    other.write_text("not ours")
    CheckpointManager(folder, clean_up=False)
    assert leftover.exists()  # a reader (evaluate.py) leaves a live run's writes alone
    CheckpointManager(folder)
    assert not leftover.exists() and other.exists()
    assert [p.name for p in CheckpointManager(folder).checkpoints()] == ["step_00000001.pt"]


def _damage(path, how):
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "garbage": bytes(random.Random(0).randrange(256) for _ in range(len(data))),
        "zero-filled": bytes(len(data)),
        "empty": b"",
    }[how]
    path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["truncated", "garbage", "zero-filled", "empty"])
def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, how, caplog):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        manager.save({"step": step}, step)
    _damage(tmp_path / "step_00000003.pt", how)
    with caplog.at_level(logging.WARNING, logger="eomt.checkpointing"):
        path, state = manager.load_latest()
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "step_00000003.pt is unreadable" in caplog.text and "step_00000003.pt.corrupt" in caplog.text
    assert (tmp_path / "step_00000003.pt.corrupt").exists()  # set aside, never deleted
    assert [p.name for p in manager.checkpoints()] == ["step_00000001.pt", "step_00000002.pt"]


def test_resume_with_no_readable_checkpoint_is_one_line(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.load_latest() is None  # a fresh run
    (tmp_path / "step_00000004.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"^none of the 1 checkpoints in .* trainer\.resume=never"
    ) as error:
        manager.load_latest()
    assert "\n" not in str(error.value)
    assert (tmp_path / "step_00000004.pt.corrupt").exists()


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    atomic_save({"rng": rng_state()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_training_state_round_trips_with_the_rng_streams(tmp_path):
    def parts(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        return model, optimizer, torch.amp.GradScaler(enabled=False)

    model, optimizer, scaler = parts(0)
    manager = CheckpointManager(
        tmp_path,
        train_state=TrainState(step=7, skipped_steps=2),
        parts={"model": model, "optimizer": optimizer, "scaler": scaler},
        config={"a": 1},
    )
    path = manager.save_training_state(7)
    assert path == manager.latest()
    expected_draw = torch.rand(3)

    fresh_model, fresh_optimizer, fresh_scaler = parts(1)
    fresh_state = TrainState()
    fresh = CheckpointManager(
        tmp_path,
        train_state=fresh_state,
        parts={"model": fresh_model, "optimizer": fresh_optimizer, "scaler": fresh_scaler},
    )
    assert fresh.restore_training_state() == path
    assert fresh_state.state_dict() == {"step": 7, "skipped_steps": 2}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the saved run was
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value)
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    restored = [s["exp_avg"] for s in fresh_optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, restored, strict=True))


def test_the_manager_saves_on_its_cadence_and_each_step_once(tmp_path, monkeypatch):
    state = TrainState()
    manager = CheckpointManager(tmp_path, keep_last=5, every_steps=3, train_state=state, config={})
    writes = []
    real_save = manager.save
    monkeypatch.setattr(
        manager, "save", lambda content, step: writes.append(step) or real_save(content, step)
    )
    for step in range(1, 8):
        state.step = step
        manager.maybe_save(step, last=step == 7)
    assert writes == [3, 6, 7]  # every 3 steps and the last
    assert manager.save_training_state(7) == tmp_path / "step_00000007.pt"
    assert writes == [3, 6, 7]  # step 7 is saved already: not written again
    assert torch.load(manager.latest(), weights_only=True)["step"] == 7
    assert CheckpointManager(tmp_path, train_state=TrainState()).restore_training_state() == manager.latest()
    assert CheckpointManager(tmp_path / "empty", train_state=TrainState()).restore_training_state() is None


class _FullDisk:
    """os.fdopen whose files take `room` bytes, then fail as a full disk does (ENOSPC)."""

    def __init__(self, room: int):
        self.room = room
        self.real_fdopen = os.fdopen

    def __call__(self, fd, mode="r", *args, **kwargs):
        file = self.real_fdopen(fd, mode, *args, **kwargs)
        real_write, disk = file.write, self

        def write(data):
            if len(data) > disk.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            disk.room -= len(data)
            return real_write(data)

        file.write = write
        return file


def test_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys):
    manager = CheckpointManager(tmp_path / "checkpoints")
    state = {"model": {"w": torch.arange(250_000, dtype=torch.float32)}, "step": 2}
    manager.save(state, 2)
    monkeypatch.setattr(os, "fdopen", _FullDisk(room=10_000))
    with pytest.raises(SystemExit), user_errors():
        manager.save({**state, "step": 4}, 4)
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message
    assert f"no space left on the device of {tmp_path / 'checkpoints'}" in message
    assert "step_00000004.pt (1.0 MB)" in message and "resumes from step 2 (step_00000002.pt)" in message
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002.pt"]  # no temp file
    assert manager.load_latest()[1]["step"] == 2


@pytest.mark.parametrize("name", ["metrics.json", "overlays/1.png"])
def test_full_disk_during_metrics_or_overlays_is_one_error(tmp_path, monkeypatch, name):
    from eomt.inference.writers import write_png

    (tmp_path / "overlays").mkdir()
    monkeypatch.setattr(os, "fdopen", _FullDisk(room=0))
    with pytest.raises(DiskFullError) as error:
        if name.endswith(".json"):
            write_json(tmp_path / name, {"pq": 60.57})
        else:
            write_png(tmp_path / name, np.zeros((4, 4, 3), np.uint8))
    assert f"device of {(tmp_path / name).parent}: could not write {Path(name).name} (" in str(error.value)
    monkeypatch.undo()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
