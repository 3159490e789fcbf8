"""Load a ready-to-run EoMT network from a config and a checkpoint, outside any training script.

net = eomt.api.load(["model=vit_l", "dataset=coco"], checkpoint="pytorch_model.bin")
"""

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from eomt.config import compose
from eomt.model import build_model, load_checkpoint, read_checkpoint


def load(overrides: Sequence[str] = (), checkpoint: str | Path | None = None) -> nn.Module:
    """The network of the composed config (default model vit_l, dataset coco) in eval mode.

    With a checkpoint the backbone's pretrained weights are not fetched, except for the DINOv3 delta
    checkpoints that are stored relative to them.
    """
    return load_model(compose(list(overrides)).model, checkpoint)


def load_model(
    model_cfg: DictConfig, checkpoint: str | Path | None = None, skip_class_head: bool = False
) -> nn.Module:
    """`load` for an already composed `cfg.model` (what evaluate.py and fine-tuning have)."""
    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and not ckpt.needs_pretrained_backbone:
        model_cfg = model_cfg.copy()
        model_cfg.pretrained = False
        model_cfg.pretrained_file = None
    model = build_model(model_cfg)
    if ckpt is not None:
        load_checkpoint(model, ckpt, skip_class_head=skip_class_head)
    return model.eval()
