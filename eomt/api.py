"""Load a ready-to-run EoMT network from a config and a checkpoint, outside any training script.

net = eomt.api.load(["model=vit_l", "dataset=coco"], checkpoint="pytorch_model.bin")
net = eomt.api.load(checkpoint="tue-mps/coco_panoptic_eomt_large_640")  # a released model and its preset
net = eomt.api.load(checkpoint="outputs/demo")  # a run directory: the network of its config.yaml
net = eomt.api.load(checkpoint="hf_folder")  # a Transformers save_pretrained folder: its config.json
"""

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from eomt import model_zoo
from eomt.checkpoint_config import compose_for
from eomt.checkpointing import CheckpointManager
from eomt.errors import CheckpointError
from eomt.model import build_model, load_checkpoint, read_checkpoint


def load(overrides: Sequence[str] = (), checkpoint: str | Path | None = None) -> nn.Module:
    """The network of the composed config in eval mode: default model vit_l, dataset coco, unless the
    checkpoint brings its own (a released name's preset, a run directory's config.yaml, a Transformers
    config.json; eomt.checkpoint_config), which `overrides` still override.

    With a checkpoint the backbone's pretrained weights are not fetched, except for the DINOv3 delta
    checkpoints that are stored relative to them.
    """
    return load_model(compose_for(overrides, checkpoint).model, checkpoint)


def load_model(
    model_cfg: DictConfig, checkpoint: str | Path | None = None, skip_class_head: bool = False
) -> nn.Module:
    """`load` for an already composed `cfg.model` (what evaluate.py and fine-tuning have). The
    checkpoint: a file, a Transformers folder, a run directory or a hub name (eomt.model_zoo)."""
    ckpt = None
    if checkpoint is not None:
        model_zoo.check_fits(checkpoint, model_cfg, skip_class_head)
        ckpt = read_checkpoint(resolve_checkpoint(checkpoint))
    if ckpt is not None and not ckpt.needs_pretrained_backbone:
        model_cfg = model_cfg.copy()
        model_cfg.pretrained = False
        model_cfg.pretrained_file = None
    model = build_model(model_cfg)
    if ckpt is not None:
        load_checkpoint(model, ckpt, skip_class_head=skip_class_head)
    return model.eval()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or Transformers folder as given; a run directory -> its newest checkpoint;
    a hub name (tue-mps/<repo>, hf://<org>/<repo>) -> its weights in the Hugging Face cache."""
    if model_zoo.hub_repo(path) is not None:
        return model_zoo.download(path)
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a training run directory
        latest = CheckpointManager(path / "checkpoints", clean_up=False).latest()
        if latest is None:
            raise CheckpointError(f"run directory {path} has no checkpoint yet; train it first")
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint={path} does not exist; fix the path")
    return path
