"""EoMT: the Encoder-only Mask Transformer."""

__version__ = "0.1.0"

from eomt import resolvers as _resolvers  # noqa: E402,F401  (the resolvers conf/ uses)
