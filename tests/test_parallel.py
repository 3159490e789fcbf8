"""eomt.parallel: activation checkpointing, and DDP / FSDP2 wrapping of the training model."""

import copy

import pytest
import torch

from eomt.errors import ConfigError
from eomt.parallel import CHECKPOINT_PREFIX, apply_activation_checkpointing, checkpoint_every


@pytest.mark.parametrize(("setting", "every"), [("none", 0), (None, 0), ("blocks", 1), (1, 1), (3, 3)])
def test_checkpoint_every_reads_the_setting(setting, every):
    assert checkpoint_every(setting) == every


@pytest.mark.parametrize("setting", ["all", 0.5, -1, True])
def test_checkpoint_every_rejects_other_settings_in_one_line(setting):
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing=.*none|blocks"):
        checkpoint_every(setting)


def _grads(model, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one forward/backward from `seed` (drop path and annealing draw from it)."""
    torch.manual_seed(seed)
    images = torch.rand(2, 3, 64, 64)
    mask_logits, class_logits = model(images)
    loss = sum(m.square().mean() for m in mask_logits) + sum(c.square().mean() for c in class_logits)
    loss.backward()
    grads = {name.replace(CHECKPOINT_PREFIX, ""): p.grad for name, p in model.named_parameters()}
    return loss.item(), grads


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_blocks_give_the_same_gradients_mid_annealing_with_drop_path(make_tiny_eomt, every):
    torch.manual_seed(0)
    plain = make_tiny_eomt(
        backbone_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2, "drop_path_rate": 0.3}
    )
    plain.set_attn_mask_probs([0.5, 0.7])  # mid-annealing: the forward draws which masks are lifted
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, every)

    wrapped = [
        i for i, b in enumerate(checkpointed.backbone.blocks) if hasattr(b, "_checkpoint_wrapped_module")
    ]
    assert wrapped == list(range(every - 1, 4, every))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys

    loss, grads = _grads(plain, seed=1)
    loss_ckpt, grads_ckpt = _grads(checkpointed, seed=1)
    assert loss_ckpt == loss
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    # Drop path is on and matters: another seed gives another loss.
    assert _grads(copy.deepcopy(plain), seed=2)[0] != loss
