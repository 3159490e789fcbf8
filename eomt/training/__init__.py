"""Training parts: batch layout, matcher, loss, optimiser groups, lr schedule, mask-annealing schedule."""

from eomt.training.annealing import annealing_probs, annealing_windows, default_annealing_windows
from eomt.training.batch_layout import batch_layout
from eomt.training.criterion import MaskClassificationLoss
from eomt.training.lr_schedule import lr_factor, set_lr
from eomt.training.matcher import HungarianMatcher
from eomt.training.param_groups import param_groups

__all__ = [
    "HungarianMatcher",
    "MaskClassificationLoss",
    "annealing_probs",
    "annealing_windows",
    "batch_layout",
    "default_annealing_windows",
    "lr_factor",
    "param_groups",
    "set_lr",
]
