"""Fixed 2-D sine position encoding (DETR), as the Mask2Former pixel and Transformer decoders use it."""

import math

import torch


def sine_position_encoding(
    height: int,
    width: int,
    dim: int,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(1, dim, H, W): half the channels encode y, half x, each as interleaved sin/cos of the
    position normalised to (0, 2*pi]."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    num_feats = dim // 2
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * 2 * math.pi
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * 2 * math.pi
    exponent = 2 * (torch.arange(num_feats, device=device) // 2) / num_feats
    freqs = temperature**exponent
    pos_y = y[:, None] / freqs  # (H, F)
    pos_x = x[:, None] / freqs  # (W, F)
    pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)
    pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat(
        [
            pos_y[:, None, :].expand(height, width, num_feats),
            pos_x[None, :, :].expand(height, width, num_feats),
        ],
        dim=2,
    )
    return pos.permute(2, 0, 1)[None].to(dtype)
