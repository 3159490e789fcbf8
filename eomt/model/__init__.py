"""The EoMT network, its construction from config, and checkpoint loading."""

from eomt.model.build import build_model
from eomt.model.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from eomt.model.eomt import EoMT

__all__ = ["EoMT", "build_model", "load_checkpoint", "read_checkpoint", "CheckpointError"]
