import pytest
import torch
from torch import nn

from eomt.training import lr_factor, set_lr

TOTAL, WARMUP, BACKBONE_WARMUP = 10_000, 500, 1000


def heads(step: int) -> float:
    return lr_factor(step, TOTAL, WARMUP, BACKBONE_WARMUP, is_backbone=False)


def backbone(step: int) -> float:
    return lr_factor(step, TOTAL, WARMUP, BACKBONE_WARMUP, is_backbone=True)


def test_non_backbone_warms_up_then_decays_from_the_end_of_its_warmup():
    assert heads(0) == 0.0
    assert heads(250) == pytest.approx(0.5)
    assert heads(500) == pytest.approx(1.0)
    # progress = (step - 500) / (10000 - 500)
    assert heads(5250) == pytest.approx(0.5**0.9)
    assert heads(500 + 0.9 * 9500) == pytest.approx(0.1**0.9)
    assert heads(TOTAL) == 0.0
    assert heads(TOTAL + 10) == 0.0


def test_backbone_waits_then_warms_up_then_decays_from_the_end_of_its_own_warmup():
    assert [backbone(s) for s in (0, 250, 499, 500)] == [0.0, 0.0, 0.0, 0.0]
    assert backbone(1000) == pytest.approx(0.5)
    assert backbone(1500) == pytest.approx(1.0)
    # progress = (step - 1500) / (10000 - 1500)
    assert backbone(5750) == pytest.approx(0.5**0.9)
    assert backbone(TOTAL) == 0.0


def test_decay_is_monotone_after_warmup():
    factors = [heads(s) for s in range(WARMUP, TOTAL + 1, 97)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))
    factors = [backbone(s) for s in range(WARMUP + BACKBONE_WARMUP, TOTAL + 1, 97)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, 100, 0, 0, is_backbone=False) == 1.0
    assert lr_factor(0, 100, 0, 0, is_backbone=True) == 1.0
    assert lr_factor(50, 100, 0, 0, is_backbone=True) == pytest.approx(0.5**0.9)


def test_too_short_a_run_for_the_warmups_is_refused():
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, 1500, WARMUP, BACKBONE_WARMUP, is_backbone=False)


def test_set_lr_scales_each_groups_base_lr():
    backbone_param, head_param = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW(
        [
            {"params": [backbone_param], "lr": 0.5, "base_lr": 0.5, "is_backbone": True},
            {"params": [head_param], "lr": 2.0, "base_lr": 2.0, "is_backbone": False},
        ]
    )
    for step in (1000, 5750):  # repeated calls read base_lr, never the lr they wrote
        set_lr(optimizer, step, TOTAL, WARMUP, BACKBONE_WARMUP)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * backbone(step))
        assert optimizer.param_groups[1]["lr"] == pytest.approx(2.0 * heads(step))
    assert [g["base_lr"] for g in optimizer.param_groups] == [0.5, 2.0]

    plain = torch.optim.AdamW([head_param], lr=1.0)
    with pytest.raises(KeyError, match="param_groups"):
        set_lr(plain, 0, TOTAL, WARMUP, BACKBONE_WARMUP)
