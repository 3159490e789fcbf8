"""Self-attention computed with F.scaled_dot_product_attention on a timm attention module's own weights.

EoMT needs two things timm's attention modules do not offer: a per-sample attention mask in the query
blocks, and rotary embeddings on the patch tokens only once queries sit in front of the sequence. So we
run the module's projections, norms and rope ourselves and keep one attention kernel for every path.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from eomt.model.registry import lookup

QkvProjection = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, N, H*hd) -> (B, H, N, hd)."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, -1, head_dim).transpose(1, 2)


def _fused_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _separate_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (
        _heads(attn.q_proj(x), attn.head_dim),
        _heads(attn.k_proj(x), attn.head_dim),
        _heads(attn.v_proj(x), attn.head_dim),
    )


def _eva_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if attn.qkv is None:
        return _separate_qkv(attn, x)
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    batch, tokens, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, bias)
    qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _rope_attention_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _fused_qkv(attn, x) if attn.qkv is not None else _separate_qkv(attn, x)


QKV_PROJECTIONS: dict[type, QkvProjection] = {
    Attention: _fused_qkv,
    EvaAttention: _eva_qkv,
    AttentionRope: _rope_attention_qkv,
}


def qkv_projection(attn: nn.Module) -> QkvProjection:
    """The q/k/v projection for a timm attention module, or a one-line error naming the module."""
    return lookup(QKV_PROJECTIONS, attn, "attention module")


def _rotate_patches(x: Tensor, rope: Tensor, num_unroped: int, half: bool) -> Tensor:
    rotated = apply_rot_embed_cat(x[:, :, num_unroped:], rope, half=half)
    return torch.cat((x[:, :, :num_unroped], rotated.type_as(x)), dim=2)


def attention(
    attn: nn.Module,
    x: Tensor,
    rope: Tensor | None = None,
    num_unroped: int = 0,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Self-attention of `x` (B, N, D) through `attn`'s weights.

    rope: the backbone's rotary embedding for the patch tokens, applied to tokens `num_unroped:`
    (queries and prefix tokens stay unrotated). attn_mask: bool (B, 1, N, N), True = may attend.
    """
    q, k, v = qkv_projection(attn)(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q = _rotate_patches(q, rope, num_unroped, attn.rotate_half)
        k = _rotate_patches(k, rope, num_unroped, attn.rotate_half)
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).flatten(2))
    if attn.gate is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))
