"""Mask2Former's Transformer decoder: learned queries refined by masked cross-attention.

Each layer: masked cross-attention to one memory level (levels taken round-robin, coarse first),
self-attention among the queries, FFN; all post-norm. Before the first layer and after every
layer the shared heads predict masks and classes; each query's mask (logit >= 0, resized to the
next layer's memory level) limits what it attends to in that layer.
"""

import torch
import torch.nn.functional as F
from torch import nn

from eomt.model.mask2former.position_encoding import sine_position_encoding


class Attention(nn.Module):
    """Multi-head attention (batch first) on `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """allowed: bool, broadcastable to (B, heads, Lq, Lk); True where a query may attend."""
        q, k, v = (
            self._split_heads(p(x))
            for p, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_feedforward: int) -> None:
        super().__init__()
        self.cross_attn = Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.self_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim_feedforward), nn.ReLU(), nn.Linear(dim_feedforward, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        queries = self.cross_norm(
            queries + self.cross_attn(queries + query_pos, memory + memory_pos, memory, allowed)
        )
        q = queries + query_pos
        queries = self.self_norm(queries + self.self_attn(q, q, queries))
        return self.ffn_norm(queries + self.ffn(queries))


class MaskedTransformerDecoder(nn.Module):
    """Returns (mask_logits, class_logits) lists: the prediction before the first layer and after
    each layer (num_layers + 1 entries) in training, only the final one in eval mode."""

    def __init__(
        self,
        num_classes: int,
        num_queries: int = 200,
        hidden_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 9,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.layers = nn.ModuleList(
            [DecoderLayer(hidden_dim, num_heads, dim_feedforward) for _ in range(num_layers)]
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, mask_dim),
        )

    def predict(
        self, queries: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> mask logits (B,Q,H/4,W/4), class logits (B,Q,C+1), attention mask (B,1,Q,h*w) for `attn_size`."""
        queries = self.decoder_norm(queries)
        class_logits = self.class_head(queries)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), mask_features)
        resized = F.interpolate(mask_logits, size=attn_size, mode="bilinear", align_corners=False)
        allowed = resized.detach().flatten(2) >= 0
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # an empty mask attends everywhere
        return mask_logits, class_logits, allowed[:, None]

    def forward(
        self, memory: list[torch.Tensor], mask_features: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """memory: `num_levels` maps (B, hidden_dim, h, w), coarse to fine; mask_features: (B, mask_dim, H/4, W/4)."""
        if len(memory) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} memory levels, got {len(memory)}")
        sizes = [tuple(m.shape[-2:]) for m in memory]
        tokens = [
            m.flatten(2).transpose(1, 2) + e for m, e in zip(memory, self.level_embed.weight, strict=True)
        ]
        positions = [
            sine_position_encoding(h, w, m.shape[1], device=m.device, dtype=m.dtype)
            .flatten(2)
            .transpose(1, 2)
            for (h, w), m in zip(sizes, memory, strict=True)
        ]
        batch = mask_features.shape[0]
        queries = self.query_feat.weight.expand(batch, -1, -1)
        query_pos = self.query_embed.weight.expand(batch, -1, -1)

        mask_logits, class_logits, allowed = self.predict(queries, mask_features, sizes[0])
        all_masks, all_classes = [mask_logits], [class_logits]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            queries = layer(queries, query_pos, tokens[level], positions[level], allowed)
            next_size = sizes[(i + 1) % self.num_levels]
            mask_logits, class_logits, allowed = self.predict(queries, mask_features, next_size)
            all_masks.append(mask_logits)
            all_classes.append(class_logits)
        if not self.training:
            return all_masks[-1:], all_classes[-1:]
        return all_masks, all_classes
