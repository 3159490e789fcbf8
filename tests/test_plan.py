"""eomt.plan: the traced estimate against a measured CPU step, the strategies' arithmetic, the command."""

import pytest
import torch
from hydra.utils import instantiate

from eomt import plan
from eomt.config import compose
from eomt.errors import ConfigError
from eomt.model import build_model
from eomt.parallel import apply_activation_checkpointing, checkpoint_every

TARGETS = 6  # masks per image, in the measured step and the estimate alike


def measured_step_peak(cfg, targets: int) -> int:
    """Peak bytes of one real training step on the CPU (`plan.train_step`: the loop's forward, loss with
    the real matcher, backward, clipping, fused AdamW) in steady state (AdamW's moments exist), as
    `plan.measured_cpu_peak` records it."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    apply_activation_checkpointing(model, checkpoint_every(cfg.trainer.activation_checkpointing))
    criterion = instantiate(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp_dtype = plan.AMP_DTYPES[cfg.trainer.precision]
    micro = cfg.trainer.micro_batch_size or cfg.trainer.batch_size
    model.set_attn_mask_probs([0.5] * model.num_blocks)  # as the planner: mid-annealing

    def step():
        images, batch = plan.synthetic_batch(micro, cfg.dataset.crop_size, targets, cfg.dataset.num_classes)
        plan.train_step(model, criterion, optimizer, images, batch, amp_dtype, cfg.schedule.grad_clip)

    step()  # AdamW's moments exist from here on, as in every later step
    alive = list(model.parameters()) + [
        t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    ]
    return plan.measured_cpu_peak(step, alive)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "checkpointing"), [("fp32", "none"), ("bf16", "none"), ("fp32", "blocks")]
)
def test_estimate_is_within_20_percent_of_a_measured_cpu_step(precision, checkpointing):
    cfg = compose(
        [
            "experiment=demo",
            f"trainer.precision={precision}",
            f"trainer.activation_checkpointing={checkpointing}",
            "trainer.batch_size=2",
        ]
    )
    estimate = plan.plan_memory(cfg, gpus=1, targets=TARGETS)
    measured = measured_step_peak(cfg, TARGETS)
    assert abs(estimate.total - measured) <= 0.2 * measured, (estimate, measured)


def _plan(overrides, gpus=1, targets=TARGETS):
    return plan.plan_memory(compose(["experiment=demo", *overrides]), gpus=gpus, targets=targets)


def test_fsdp_divides_weights_gradients_and_adamw_state_by_the_gpus():
    # one image per GPU in both: the same activations, the shards halve
    two = _plan(["trainer.strategy=fsdp", "trainer.batch_size=2"], gpus=2)
    four = _plan(["trainer.strategy=fsdp", "trainer.batch_size=4"], gpus=4)
    ddp = _plan(["trainer.strategy=ddp", "trainer.batch_size=4"], gpus=4)
    assert two.micro_batch == four.micro_batch == 1 and two.accumulation == four.accumulation == 1
    for part in ("weights", "optimizer"):
        assert getattr(two, part) / getattr(four, part) == pytest.approx(2.0, rel=1e-3)
    for p in (two, four):  # the gradients' shards made by the peak, at most all of them
        assert 0 <= p.gradients <= p.weights
    assert two.total > four.total
    assert ddp.optimizer / four.optimizer == pytest.approx(4.0, rel=1e-3)
    assert ddp.unsharded == 4 * ddp.num_params  # DDP's gradient buckets, fp32


@pytest.mark.slow
def test_activations_grow_with_the_micro_batch_and_shrink_with_checkpointing():
    vit_s = ["model=vit_s", "model.pretrained=false", "dataset.crop_size=[256,256]", "trainer.precision=bf16"]
    one = _plan([*vit_s, "trainer.batch_size=1"])
    two = _plan([*vit_s, "trainer.batch_size=2"])
    checkpointed = _plan([*vit_s, "trainer.batch_size=2", "trainer.activation_checkpointing=blocks"])
    assert 1.5 < two.activations / one.activations <= 2.05  # per image, plus what does not grow with it
    assert checkpointed.activations < 0.8 * two.activations
    assert checkpointed.weights == two.weights and checkpointed.optimizer == two.optimizer


def test_the_trace_allocates_nothing_real():
    plans = []
    overrides = ["model=vit_s", "model.pretrained=false", "dataset.crop_size=[448,448]"]
    real = plan.measured_cpu_peak(lambda: plans.append(_plan(overrides)))
    assert plans[0].total > 1e9  # a step of about 1 GB on fake tensors ...
    assert real < 0.02 * plans[0].total  # ... while the planner's own real tensors stay small


def test_table_names_the_fastest_option_that_fits_each_card():
    def fake_plan(total_gb):
        return plan.Plan("x", "ddp", "none", 4, 4, 1, 10**9, 0, 0, 0, int(total_gb * plan.GB), 0)

    plans = {
        "small": dict(zip(plan.OPTIONS, map(fake_plan, (30, 20, 25, 10)), strict=True)),
        "large": dict(zip(plan.OPTIONS, map(fake_plan, (300, 150, 130, 100)), strict=True)),
    }
    rows = plan.table(plans).splitlines()
    assert rows[0].split(" | ")[-3:] == ["40 GB", "80 GB", "141 GB |"]
    assert rows[2].endswith("| ddp | ddp | ddp |")
    assert rows[3].endswith("| no | no | fsdp+ckpt |")  # 100 GB > 90% of 80 GB


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiment=demo", "gpus=0"], "gpus=0 must be at least 1"),
        (["experiment=demo", "gpus=two"], "gpus=two must be a positive integer"),
        (["presets=some"], "presets=some"),
        (["experiment=demo", "trainer.strategy=zero"], "trainer.strategy=zero is not one of ddp|fsdp"),
        (["experiment=demo", "trainer.batch_size=3", "gpus=2"], "trainer.batch_size=3 is not a multiple"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        plan.main(argv)


def test_command_prints_the_parts_and_the_cards(capsys):
    plan.main(["experiment=demo", "targets=3"])
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "AdamW state", "activations", "total", "40 GB: yes"):
        assert part in out


def test_all_presets_mode_prints_one_row_per_preset(monkeypatch, capsys):
    assert "demo" not in plan.published_presets() and "coco_panoptic_vit_l_640" in plan.published_presets()
    monkeypatch.setattr(plan, "published_presets", lambda: ["demo"])  # the tiny one: four quick traces
    plan.main(["--all", "targets=2", "gpus=2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| demo |")]
    assert len(rows) == 1 and rows[0].endswith("| ddp | ddp | ddp |")
