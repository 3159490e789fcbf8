"""EoMT: the Encoder-only Mask Transformer."""

__version__ = "0.1.0"

from eomt import config as _config  # noqa: E402,F401  (registers the `${workers:N}` config resolver)
