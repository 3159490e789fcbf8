import random

import numpy as np
import pytest
import torch

from eomt.checkpointing import (
    CheckpointManager,
    atomic_save,
    restore_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)


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


def test_corrupt_checkpoint_names_file_and_fix(tmp_path):
    bad = tmp_path / "step_00000003.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"step_00000003\.pt.*trainer\.resume=never"):
        CheckpointManager.load(bad)


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
    manager = CheckpointManager(tmp_path)
    path = save_training_state(
        manager,
        step=7,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        config={"a": 1},
        counters={"skipped": 2},
    )
    assert path == manager.latest()
    expected_draw = torch.rand(3)

    fresh_model, fresh_optimizer, fresh_scaler = parts(1)
    state = restore_training_state(path, model=fresh_model, optimizer=fresh_optimizer, scaler=fresh_scaler)
    assert state == {"step": 7, "skipped": 2}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the saved run was
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value)
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    restored = [s["exp_avg"] for s in fresh_optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, restored, strict=True))
