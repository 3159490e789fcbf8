"""EoMT: a plain timm ViT whose last `num_blocks` blocks also process learned queries, plus tiny heads."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from eomt.model.backbone import BackboneRunner, create_backbone
from eomt.model.heads import mask_mlp, upscale
from eomt.model.size import as_pair


class EoMT(nn.Module):
    """Encoder-only Mask Transformer.

    forward(images (B,3,H,W) in [0,1]) -> (mask_logits, class_logits): lists with one (B,Q,H/4,W/4) /
    (B,Q,C+1) entry per prediction point: before each query block when `masked_attn` is on, then the
    final prediction (always last). Class index `num_classes` is "no object".
    `num_upscale_blocks=0` (an ablation) predicts masks at the patch grid (1/16) instead of 1/4.
    """

    def __init__(
        self,
        backbone: str,
        img_size: int | Sequence[int],
        num_classes: int,
        num_queries: int = 200,
        num_blocks: int = 4,
        patch_size: int = 16,
        pretrained: bool = False,
        masked_attn: bool = True,
        backbone_kwargs: dict | None = None,
        pretrained_file: str | Path | None = None,
        num_upscale_blocks: int | None = None,
        backbone_config: dict | None = None,
    ):
        super().__init__()
        self.img_size = as_pair(img_size)
        if any(side % patch_size for side in self.img_size):
            raise ValueError(
                f"model.img_size={list(self.img_size)} must be a multiple of model.patch_size={patch_size}"
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_blocks = num_blocks
        self.masked_attn = masked_attn
        self.backbone = create_backbone(
            backbone,
            self.img_size,
            patch_size,
            pretrained,
            pretrained_file,
            backbone_config,
            **(backbone_kwargs or {}),
        )
        # Whether the backbone holds pretrained weights: DINOv3 delta checkpoints are relative to them.
        self.backbone_pretrained = pretrained
        self._runner = BackboneRunner(self.backbone)
        self.num_prefix_tokens = self._runner.num_prefix_tokens
        depth = len(self.backbone.blocks)
        if not 1 <= num_blocks <= depth:
            raise ValueError(f"model.num_blocks={num_blocks} must be in 1..{depth} (the depth of {backbone})")

        dim = self.backbone.embed_dim
        self.q = nn.Embedding(num_queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = mask_mlp(dim)
        self.upscale = upscale(dim, self._runner.patch_size, num_upscale_blocks)
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))
        self._host_probs: tuple[int, list[float]] | None = None  # (buffer version, its values) from set_...
        self._compiled: dict[str, Callable] = {}  # compile_regions(): name in REGIONS -> compiled method
        self.register_buffer(
            "pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False
        )

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Images in [0,1] -> tokens [prefix | patches], the rotary embedding (or None) and the patch grid."""
        return self._runner.embed((images - self.pixel_mean) / self.pixel_std)

    def predict(self, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Mask logits (B,Q,4h,4w) and class logits (B,Q,C+1) from tokens [queries | prefix | patches]."""
        tokens = self.backbone.norm(tokens)
        queries = tokens[:, : self.num_queries]
        patches = tokens[:, self.num_queries + self.num_prefix_tokens :]
        pixels = self.upscale(patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid))
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), pixels)
        return mask_logits, self.class_head(queries)

    def set_attn_mask_probs(self, probs: Sequence[float]) -> None:
        """Write the blocks' annealing probabilities; also kept on the host, so that the forward pass
        decides whether to draw without reading the device (valid until the buffer changes again)."""
        host = torch.tensor(probs, dtype=self.attn_mask_probs.dtype)
        self.attn_mask_probs.copy_(host)
        self._host_probs = (self.attn_mask_probs._version, host.tolist())

    @torch.compiler.disable
    def _host_prob(self, block: int) -> float | None:
        """Block `block`'s probability as set_attn_mask_probs wrote it; None if the buffer changed since."""
        if self._host_probs is None or self._host_probs[0] != self.attn_mask_probs._version:
            return None
        return self._host_probs[1][block]

    def attention_mask(
        self, mask_logits: Tensor, grid: tuple[int, int], prob: Tensor, host_prob: float | None = None
    ) -> Tensor:
        """Bool (B,1,N,N) over [queries | prefix | patches], True = may attend.

        Query q sees the patches where its logit, resized to the patch grid, is > 0; with probability
        1 - prob per (image, query) that restriction is lifted. Queries always see queries and prefix
        tokens; prefix and patch tokens see everything.
        """
        batch, num_queries = mask_logits.shape[:2]
        lifted = _lifted_queries(prob, host_prob, batch, num_queries, mask_logits.device)
        return self._region("mask_from_logits")(mask_logits, grid, lifted)

    def mask_from_logits(self, mask_logits: Tensor, grid: tuple[int, int], lifted: Tensor | None) -> Tensor:
        """`attention_mask` once the lifted (image, query) pairs (bool (B,Q,1), or None) are drawn."""
        batch, num_queries = mask_logits.shape[:2]
        start = num_queries + self.num_prefix_tokens
        num_tokens = start + grid[0] * grid[1]
        on_mask = F.interpolate(mask_logits, size=grid, mode="bilinear").flatten(2) > 0
        mask = torch.ones(batch, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device)
        mask[:, :num_queries, start:] = on_mask if lifted is None else on_mask | lifted
        return mask[:, None]

    def compile_regions(self, **options: Any) -> None:
        """Regional compilation, as torchtitan and PyTorch's recipe do it: every block compiled whole
        (`fullgraph=True`; the blocks share one code object, hence one set of graphs whatever the depth),
        and so are the embedding, the heads and the attention mask. The loop over the blocks and the
        annealing draw stay in Python, so no host decision becomes a guard of a compiled graph and the
        draws use the eager random stream. `options` go to torch.compile (e.g. mode)."""
        for block in self.backbone.blocks:
            block.compile(fullgraph=True, **options)
        for name in REGIONS:
            self._compiled[name] = torch.compile(getattr(self, name), fullgraph=True, **options)

    def _region(self, name: str) -> Callable:
        return self._compiled.get(name) or getattr(self, name)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        tokens, rope, grid = self._region("embed")(images)
        predict = self._region("predict")
        first_query_block = len(self.backbone.blocks) - self.num_blocks
        mask_logits: list[Tensor] = []
        class_logits: list[Tensor] = []
        attn_mask = None
        for i, block in enumerate(self.backbone.blocks):
            if i == first_query_block:
                queries = self.q.weight.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
                tokens = torch.cat((queries, tokens), dim=1)
            in_query_blocks = i >= first_query_block
            if self.masked_attn and in_query_blocks:
                masks, classes = predict(tokens, grid)
                mask_logits.append(masks)
                class_logits.append(classes)
                index = i - first_query_block
                attn_mask = self.attention_mask(
                    masks, grid, self.attn_mask_probs[index], self._host_prob(index)
                )
            num_unroped = self.num_prefix_tokens + (self.num_queries if in_query_blocks else 0)
            tokens = block(tokens, self._runner.block_rope(rope, i), num_unroped, attn_mask)
        masks, classes = predict(tokens, grid)
        mask_logits.append(masks)
        class_logits.append(classes)
        return mask_logits, class_logits


REGIONS = ("embed", "predict", "mask_from_logits")  # EoMT's methods compiled whole besides the blocks


@torch.compiler.disable
def _lifted_queries(
    prob: Tensor, host_prob: float | None, batch: int, num_queries: int, device: torch.device
) -> Tensor | None:
    """Bool (B,Q,1): the (image, query) pairs whose mask is lifted, each with probability 1 - prob.

    As in the authors' release, the random numbers are drawn only when prob < 1 (a fully masked
    block draws none), so the random stream matches theirs; it stays out of compiled graphs since the
    branch reads the probability (from the host when `host_prob` is known, else from the device) and
    since a compiled graph draws from another random stream.
    """
    if not (bool(prob < 1) if host_prob is None else host_prob < 1):
        return None
    return torch.rand(batch, num_queries, 1, device=device) > prob
