"""eomt.plan: the traced estimate against a measured CPU step, the strategies' arithmetic, the command."""

import pytest
import torch
from hydra.utils import instantiate
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from eomt import plan
from eomt.config import compose
from eomt.model import build_model

TARGETS = 6  # masks per image, in the measured step and the estimate alike


def allocation_events(prof) -> list[tuple[int, int]]:
    """(time ns, bytes: + allocated, - freed) of every CPU allocation the profiler recorded."""
    out = []

    def walk(event):
        if event.tag == _EventType.Allocation:
            out.append((event.start_time_ns, event.extra_fields.alloc_size))
        for child in event.children:
            walk(child)

    for event in prof.profiler.kineto_results.experimental_event_tree():
        walk(event)
    return sorted(out)


def measured_step_peak(cfg, targets: int) -> int:
    """Peak bytes of one real training step on the CPU (the loop's: uint8 batch -> float, autocast
    forward, loss with the real matcher, backward, clipping, fused AdamW), in steady state (AdamW's
    state exists): the bytes alive before the step plus the highest running sum of the allocations
    and frees that torch.profiler(profile_memory=True) records during it."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    criterion = instantiate(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp_dtype = plan.AMP_DTYPES[cfg.trainer.precision]
    micro, _ = plan.layout(cfg, 1)
    crop = list(cfg.dataset.crop_size)
    model.set_attn_mask_probs([0.5] * model.num_blocks)

    def step():
        images = torch.randint(0, 256, (micro, 3, *crop), dtype=torch.uint8)
        batch = [
            {
                "masks": torch.rand(targets, *crop) > 0.5,
                "labels": torch.arange(targets) % cfg.dataset.num_classes,
            }
            for _ in range(micro)
        ]
        x = images.float().div_(255)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            mask_logits, class_logits = model(x)
        loss, _ = criterion(mask_logits, class_logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.schedule.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on, as in every later step
    alive = [p for p in model.parameters()] + [
        t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    ]
    before = sum(t.untyped_storage().nbytes() for t in alive)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running, highest = 0, 0
    for _, nbytes in allocation_events(prof):
        running += nbytes
        highest = max(highest, running)
    return before + highest


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_is_within_20_percent_of_a_measured_cpu_step(precision):
    cfg = compose(["experiment=demo", f"trainer.precision={precision}", "trainer.batch_size=2"])
    estimate = plan.plan_memory(cfg, gpus=1, targets=TARGETS)
    measured = measured_step_peak(cfg, TARGETS)
    assert abs(estimate.total - measured) <= 0.2 * measured, (estimate, measured)
