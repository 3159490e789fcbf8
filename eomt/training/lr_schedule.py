"""Two-stage linear warmup, then polynomial decay: the lr as a pure function of the step.

Non-backbone groups warm up over `warmup_steps`. Backbone groups stay at 0 for those steps, then
warm up over `backbone_warmup_steps`. After its own warmup, each group decays as
`(1 - progress) ** power`, where `progress = (step - w) / (total_steps - w)` and `w` is the step at
which that group's warmup ended (`warmup_steps` for non-backbone groups, `warmup_steps +
backbone_warmup_steps` for backbone groups), as in the authors' release. Both reach 0 at
`total_steps`. Nothing to checkpoint: resuming at a step gives the same lr.
"""

from torch.optim import Optimizer


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    backbone_warmup_steps: int,
    is_backbone: bool,
    power: float = 0.9,
) -> float:
    """Multiplier in [0, 1] of a group's base lr at `step` (0-based)."""
    if warmup_steps < 0 or backbone_warmup_steps < 0:
        raise ValueError(f"warmup steps must be >= 0, got {warmup_steps} and {backbone_warmup_steps}")
    if total_steps <= warmup_steps + backbone_warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps + backbone_warmup_steps "
            f"({warmup_steps} + {backbone_warmup_steps}); shorten the warmups or train longer"
        )
    if is_backbone:
        if step < warmup_steps:
            return 0.0
        step -= warmup_steps
        total_steps -= warmup_steps
        warmup_steps = backbone_warmup_steps
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return max(0.0, 1.0 - progress) ** power


def set_lr(
    optimizer: Optimizer,
    step: int,
    total_steps: int,
    warmup_steps: int,
    backbone_warmup_steps: int,
    power: float = 0.9,
    two_stage: bool = True,
) -> None:
    """Write `group["lr"] = group["base_lr"] * lr_factor(...)` into every param group.

    `two_stage=False` (an ablation) warms the backbone up together with the other groups."""
    for group in optimizer.param_groups:
        if "base_lr" not in group or "is_backbone" not in group:
            raise KeyError(
                "optimizer param group lacks 'base_lr'/'is_backbone'; build the optimizer from "
                "eomt.training.param_groups(model, ...)"
            )
        factor = lr_factor(
            step, total_steps, warmup_steps, backbone_warmup_steps, group["is_backbone"] and two_stage, power
        )
        group["lr"] = group["base_lr"] * factor
