"""The EoMT network, its construction from config, and checkpoint loading."""

from eomt.model.build import build_model
from eomt.model.eomt import EoMT
from eomt.model.weight_formats import CheckpointError, load_checkpoint, read_checkpoint

__all__ = ["EoMT", "build_model", "load_checkpoint", "read_checkpoint", "CheckpointError"]
