"""The authors' EoMT network, built from their release's own code, holding one of our models' weights: the
`release*` runtimes of bench/forward.py and bench/train_step.py."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from torch import nn


def release_network(reference: Path, model: nn.Module, cfg) -> nn.Module:
    """The authors' EoMT (from `reference`/models, a checkout of their release) with `model`'s weights, in eval mode."""
    sys.path.insert(0, str(reference))
    from models.eomt import EoMT as ReleaseEoMT
    from models.vit import ViT

    encoder = ViT(
        img_size=tuple(model.img_size),
        patch_size=int(cfg.model.patch_size),
        backbone_name=cfg.model.backbone,
        ckpt_path="unused",  # a path: no download of pretrained weights
    )
    # The same timm module (with any backbone_kwargs); its blocks keep timm's children, which the release reads.
    encoder.backbone = copy.deepcopy(model.backbone)
    network = ReleaseEoMT(
        encoder, model.num_classes, model.num_queries, model.num_blocks, masked_attn_enabled=model.masked_attn
    )
    state = {("encoder." + k if k.startswith("backbone.") else k): v for k, v in model.state_dict().items()}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"encoder.pixel_mean", "encoder.pixel_std"}:
        raise RuntimeError(f"release network does not take our weights: {missing} {unexpected}")
    return network.to(next(model.parameters()).device).eval()
