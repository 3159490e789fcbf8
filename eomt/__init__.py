"""EoMT: the Encoder-only Mask Transformer."""

__version__ = "0.1.0"
