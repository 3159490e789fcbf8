"""`debug=smoke` and `debug=overfit` (conf/debug/) on generated data with the tiny model."""

import json

import pytest
from conftest import logged

import train
from eomt.config import compose
from eomt.data.synthetic import generate

CPU = ["model=tiny", "trainer.device=cpu", "trainer.precision=fp32"]


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EOMT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_smoke_runs_a_few_steps_of_a_real_layout_dataset_and_evaluates_a_handful(tmp_path):
    root = tmp_path / "ade20k"
    generate("ade20k", root, num_train=14, num_val=6, size=(64, 96), seed=0)
    cfg = compose([*CPU, "dataset=ade20k", f"dataset.root={root}", "debug=smoke", "loss.num_points=256"])
    assert cfg.name == "smoke_ade20k_semantic_tiny"  # its own run directory, never the real run's
    run = train.build_run(cfg, tmp_path / "run")
    assert len(run.data.dataset) == 12 and len(run.evaluation.dataset) == 4
    train.train(run)
    assert list(logged(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["step"] == 6 and "mIoU" in record["metrics"]
    assert [p.name for p in run.checkpoints.checkpoints()] == ["step_00000006.pt"]


@pytest.mark.slow
def test_overfit_drives_the_loss_down_on_four_images(tmp_path):
    cfg = compose(
        [*CPU, "dataset=synthetic", "debug=overfit", "trainer.epochs=30", "dataset.crop_size=[64,64]"]
        + ["trainer.log_every_steps=1"]
        + ["loss.num_points=512"]
    )
    run = train.build_run(cfg, tmp_path)
    assert len(run.data.dataset) == 4
    train.train(run)
    losses = list(logged(tmp_path).values())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # and still falling at 30 steps
