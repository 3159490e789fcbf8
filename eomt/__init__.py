"""EoMT: the Encoder-only Mask Transformer."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${concat:${a},${b}}` in conf/: one list after the other (COCO's panoptic names = its things + stuff).
if not OmegaConf.has_resolver("concat"):
    OmegaConf.register_new_resolver("concat", lambda *lists: [item for items in lists for item in items])
from eomt import config as _config  # noqa: E402,F401  (registers the `${workers:N}` config resolver)
