"""The training loop end to end on the synthetic data with the tiny model (CPU)."""

import json
import logging
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import logged

import train
from eomt.config import compose
from eomt.errors import ConfigError
from eomt.model import CheckpointError, build_model

FAST = [
    "experiment=demo",
    "trainer.num_workers=0",
    "trainer.batch_size=4",
    "trainer.log_every_steps=1",
    "trainer.ckpt_every_steps=1000",
    "eval.every_epochs=0",
    "loss.num_points=256",
]


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EOMT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run(tmp_path, *overrides: str) -> train.Run:
    run = train.build_run(compose([*FAST, *overrides]), tmp_path)
    train.train(run)
    return run


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "straight", "trainer.max_steps=6")
    run(tmp_path / "resumed", "trainer.max_steps=3")
    assert list(logged(tmp_path / "resumed")) == [1, 2, 3]
    second = run(tmp_path / "resumed", "trainer.max_steps=6")
    resumed = logged(tmp_path / "resumed")
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    expected = [logged(tmp_path / "straight")[s] for s in (4, 5, 6)]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_checkpoint_holds_the_whole_training_state(tmp_path):
    trained = run(tmp_path, "trainer.max_steps=2")
    state = torch.load(trained.checkpoints.latest(), weights_only=True)
    assert state["step"] == 2
    assert {"model", "optimizer", "scaler", "rng", "config"} <= set(state)
    assert state["config"]["model"]["name"] == "tiny"
    assert "attn_mask_probs" in state["model"]


def test_tensorboard_has_losses_per_block_lrs_annealing_and_speed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, "trainer.max_steps=2")
    tags = set(EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"])
    expected = {"train/loss", "train/mask/b0", "train/dice/b1", "train/class/final", "train/grad_norm"}
    expected |= {
        "lr/backbone.blocks.0",
        "lr/backbone.blocks.3",
        "lr/heads",
        "perf/images_per_s",
        "perf/other_load",
    }
    expected |= {"annealing/block0", "annealing/block1"}
    assert expected <= tags, expected - tags


def test_non_finite_loss_skips_the_step_and_stops_when_it_persists(tmp_path, monkeypatch):
    skipping = train.build_run(compose([*FAST, "trainer.max_steps=4", "trainer.max_bad_steps=2"]), tmp_path)
    real = skipping.criterion.forward
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss, logs = real(*args, **kwargs)
        return (loss * float("nan"), logs) if calls["n"] == 2 else (loss, logs)

    monkeypatch.setattr(skipping.criterion, "forward", nan_on_second_call)
    train.train(skipping)
    assert torch.load(skipping.checkpoints.latest(), weights_only=True)["skipped_steps"] == 1
    assert list(logged(tmp_path)) == [1, 3, 4]

    diverging = train.build_run(
        compose([*FAST, "trainer.max_steps=5", "trainer.max_bad_steps=2"]), tmp_path / "b"
    )
    before = {k: v.clone() for k, v in diverging.model.state_dict().items()}
    monkeypatch.setattr(
        diverging.criterion, "forward", lambda *a, **k: (torch.tensor(float("inf"), requires_grad=True), {})
    )
    with pytest.raises(train.TrainingDiverged, match="2 non-finite losses in a row"):
        train.train(diverging)
    for k, v in diverging.model.state_dict().items():
        if k != "attn_mask_probs":
            assert torch.equal(v, before[k]), k


def test_fine_tuning_onto_a_new_class_set_starts_a_fresh_class_head(tmp_path):
    panoptic = run(tmp_path / "panoptic", "trainer.max_steps=1")  # 5 classes
    checkpoint = panoptic.checkpoints.latest()
    with pytest.raises(CheckpointError, match="class_head"):
        train.build_run(compose([*FAST, "task=instance", f"trainer.init_from={checkpoint}"]), tmp_path / "x")
    tuned = train.build_run(
        compose(
            [
                *FAST,
                "task=instance",
                "trainer.max_steps=1",
                f"trainer.init_from={checkpoint}",
                "trainer.skip_class_head=true",
            ]
        ),
        tmp_path / "instance",
    )
    assert tuned.model.class_head.out_features == 3 + 1  # the synthetic things
    source = panoptic.model.state_dict()
    for key, value in tuned.model.state_dict().items():
        if not key.startswith("class_head."):
            assert torch.equal(value, source[key]), key
    train.train(tuned)


def _ddp_worker(rank: int, world: int, port: int, run_dir: str, cache: str, out: str):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        EOMT_CACHE=cache,
    )
    torch.set_num_threads(1)
    trained = train.build_run(compose([*FAST, "trainer.max_steps=3"]), Path(run_dir))
    train.train(trained)
    torch.save({k: v.clone() for k, v in trained.model.state_dict().items()}, f"{out}/rank{rank}.pt")
    train.distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_parameters(tmp_path):
    cache = os.environ["EOMT_CACHE"]
    train.build_dataset(compose(FAST).dataset, "panoptic", "train", train=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), cache, str(tmp_path)), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    initial = build_model(compose(FAST).model).state_dict()
    changed = 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
        changed += not torch.equal(a[k], initial[k])
    assert changed > 0


@pytest.mark.slow
def test_demo_learns_far_above_chance(tmp_path):
    """`experiment=demo` as `make demo` runs it (one evaluation, at the end)."""
    demo = train.build_run(
        compose(["experiment=demo", "eval.every_epochs=1000", "trainer.log_every_steps=1"]), tmp_path
    )
    train.train(demo)
    losses = list(logged(tmp_path).values())
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["step"] == demo.last_step
    assert record["metrics"]["PQ"] > 30.0  # chance is 0: nothing is matched without learning
    assert record["metrics"]["PQ_stuff"] > 60.0


def test_a_step_reads_the_device_once_and_a_logging_step_once_more(tmp_path, monkeypatch):
    """Each host read (item, float, bool, ...) stalls a GPU's stream: count them on a CPU run.

    The loss's own reads (the matcher solves the assignment on the host) are not the loop's."""
    run_ = train.build_run(compose([*FAST, "trainer.max_steps=4", "trainer.log_every_steps=4"]), tmp_path)
    reads: dict[int, int] = {}
    phase = {"step": None}

    def counting(real):
        def read(tensor, *args, **kwargs):
            if phase["step"] is not None:
                reads[phase["step"]] = reads.get(phase["step"], 0) + 1
            return real(tensor, *args, **kwargs)

        return read

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))

    def during(fn, step_of):
        def wrapped(*args, **kwargs):
            phase["step"] = step_of(*args)
            try:
                return fn(*args, **kwargs)
            finally:
                phase["step"] = None

        return wrapped

    real_loss = run_.criterion.forward

    def loss_uncounted(*args, **kwargs):
        step, phase["step"] = phase["step"], None
        try:
            return real_loss(*args, **kwargs)
        finally:
            phase["step"] = step

    monkeypatch.setattr(run_.criterion, "forward", loss_uncounted)
    monkeypatch.setattr(
        train, "optimisation_step", during(train.optimisation_step, lambda run, b, step: step + 1)
    )
    monkeypatch.setattr(
        train.TrainLog, "maybe_log", during(train.TrainLog.maybe_log, lambda log, step, terms: step)
    )
    train.train(run_)
    assert reads == {1: 2, 2: 1, 3: 1, 4: 2}  # the finite flag every step; the terms on logging steps
    assert set(logged(tmp_path)) == {1, 4}


def test_a_run_starts_with_a_banner_logs_its_progress_and_a_finished_run_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="eomt.train")
    run(tmp_path, "trainer.max_steps=2", "trainer.log_every_steps=2")
    assert f"run {tmp_path}: fresh start at step 0, last step 2 of " in caplog.text
    assert (
        "1 rank(s) on cpu (ddp), precision fp32, batch 4 = 4 per micro-batch x 1 rank(s) x 1 accumulation"
        in caplog.text
    )
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(progress) == 2  # step 1, then every log_every_steps
    # images/s carries a note when other processes were using the CPUs meanwhile (eomt.profiling.LoadMeter)
    speed = r"\d+\.\d images/s( \(under load: others used \d+% of the CPUs\))?"
    assert re.fullmatch(rf"step 2/2  loss \d+\.\d{{4}}  lr \S+  {speed}  ETA 0:00:00", progress[1])

    caplog.clear()
    run(tmp_path, "trainer.max_steps=3", "trainer.micro_batch_size=2")
    assert (
        f"resumed from {tmp_path / 'checkpoints' / 'step_00000002.pt'} at step 2, last step 3" in caplog.text
    )
    assert "batch 4 = 2 per micro-batch x 1 rank(s) x 2 accumulation step(s)" in caplog.text

    caplog.clear()
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    run(tmp_path, "trainer.max_steps=3")
    finished = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(finished) == 1 and "\n" not in finished[0]
    assert "at step 3" in finished[0] and "name=" in finished[0] and "trainer.resume=never" in finished[0]
    assert sorted((tmp_path / "checkpoints").iterdir()) == checkpoints
    assert list(logged(tmp_path)) == [1, 2, 3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            "schedule.warmup_steps=1000",
            r"^schedule.warmup_steps \+ schedule.backbone_warmup_steps = 1000 \+ 40 ",
        ),
        (
            "dataset.crop_size=[60,60]",
            r"^dataset.crop_size=\[60, 60\] .* model.patch_size=16; use e.g. .*\[64,64\]$",
        ),
        ("trainer.batch_size=512", r"^the synthetic train split has 100 images, fewer than one step"),
        ("dataset=coco task=semantic", r"^dataset coco has no semantic annotations"),
    ],
)
def test_config_mistakes_are_one_line_before_the_model_is_built(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=message):
        train.build_run(compose([*FAST, *overrides.split()]), tmp_path)


def test_a_stop_that_kills_the_evaluation_loader_saves_the_step_and_exits_0(tmp_path, capsys):
    cfg = compose(
        [*FAST, "trainer.epochs=2", "trainer.max_steps=null", "eval.every_epochs=1"]
        + ["+dataset.max_train_images=8", "+dataset.max_val_images=2"]
        + ["schedule.warmup_steps=1", "schedule.backbone_warmup_steps=0"]
    )
    run_ = train.build_run(cfg, tmp_path)
    assert run_.data.steps_per_epoch == 2

    def evaluation_killed_by_sigterm(*args, **kwargs):  # what scancel does to the eval loader's workers
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")

    run_.evaluation.run = evaluation_killed_by_sigterm
    with pytest.raises(SystemExit) as stopped:
        train.train(run_)
    assert stopped.value.code == 0
    assert [p.name for p in run_.checkpoints.checkpoints()] == ["step_00000002.pt"]
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped by SIGTERM: checkpoint saved to")
    )
