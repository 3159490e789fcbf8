"""Optimiser parameter groups with layer-wise learning-rate decay over the ViT backbone."""

import re
from collections.abc import Iterable, Sequence

from torch import nn

from eomt.errors import ConfigError

# Backbone parameter names (relative to `model.backbone`, timm VisionTransformer or Eva) -> part.
_BLOCK = re.compile(r"blocks\.(\d+)\..+")
_EMBEDDING = re.compile(r"(patch_embed\..+|pos_embed|cls_token|reg_token|mask_token|norm_pre\..+|rope\..+)")
_FINAL_NORM = re.compile(r"norm\..+")
_POSITION = re.compile(r"pos_embed")
_TOKENS = re.compile(r"(cls_token|reg_token|mask_token)")

# What `weight_decay_exempt` may name: parameters that then get no weight decay.
EXEMPTIONS = {
    "one_dim": "1-D parameters (norms, biases, layer scales)",
    "position": "the backbone's absolute position embedding",
    "tokens": "the backbone's prefix tokens (class, register, mask token)",
    "queries": "embedding tables outside the backbone (the queries)",
}

HEADS = "heads"


def _backbone_part(name: str) -> tuple[str, int | None]:
    """Group name and lr-decay layer of a backbone parameter (None: the final norm, never decayed)."""
    if block := _BLOCK.fullmatch(name):
        return f"backbone.blocks.{block.group(1)}", int(block.group(1))
    if _EMBEDDING.fullmatch(name):
        return "backbone.embed", 0
    if _FINAL_NORM.fullmatch(name):
        return "backbone.norm", None
    raise ValueError(
        f"backbone parameter '{name}' matches no layer-wise lr rule (blocks.<j>, patch/pos embedding, "
        "prefix tokens, final norm); build the backbone without it (e.g. num_classes=0) or add a rule "
        "in eomt/training/param_groups.py"
    )


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 0.8,
    decay_query_blocks: bool = True,
    weight_decay_exempt: Sequence[str] = (),
) -> list[dict]:
    """AdamW parameter groups for an EoMT model.

    Backbone block j of n gets `lr * layer_decay ** (n - 1 - j)`; patch/position embeddings and
    prefix tokens get block 0's rate; the backbone's final norm gets `lr`. With
    `decay_query_blocks=False` the last `model.num_blocks` blocks get `lr` too. Everything outside
    the backbone (queries, heads, upscale blocks, ...) gets `lr`.

    Every parameter gets `weight_decay`, as in the authors' release. `weight_decay_exempt` names
    kinds of parameters to leave undecayed instead (keys of `EXEMPTIONS`; all four give the usual
    timm / Mask2Former convention).

    Each group: params, lr and base_lr (its peak lr, which `set_lr` scales), weight_decay,
    is_backbone, and name (`backbone.embed`, `backbone.blocks.<j>`, `backbone.norm`, `heads`; a
    name holds one lr, but may occur twice: with and without weight decay).
    """
    unknown = set(weight_decay_exempt) - set(EXEMPTIONS)
    if unknown:
        raise ConfigError(
            f"schedule.weight_decay_exempt: unknown {sorted(unknown)}; choose from {sorted(EXEMPTIONS)}"
        )
    exempt = set(weight_decay_exempt)
    num_layers = len(model.backbone.blocks)
    num_query_blocks = getattr(model, "num_blocks", 0)  # 0: a model with a separate decoder (Mask2Former)
    if not 0 <= num_query_blocks <= num_layers:
        raise ValueError(f"model.num_blocks={num_query_blocks} must be in [1, {num_layers}] (backbone depth)")

    def layer_lr(layer: int | None) -> float:
        if layer is None or (not decay_query_blocks and layer >= num_layers - num_query_blocks):
            return lr
        return lr * layer_decay ** (num_layers - 1 - layer)

    groups: dict[tuple[str, bool], dict] = {}

    def add(part: str, param: nn.Parameter, part_lr: float, decay: bool, is_backbone: bool) -> None:
        group = groups.setdefault(
            (part, decay),
            {
                "params": [],
                "lr": part_lr,
                "base_lr": part_lr,
                "weight_decay": weight_decay if decay else 0.0,
                "is_backbone": is_backbone,
                "name": part,
            },
        )
        group["params"].append(param)

    backbone_ids = set()
    for name, param in _trainable(model.backbone.named_parameters()):
        backbone_ids.add(id(param))
        part, layer = _backbone_part(name)
        decay = not (
            ("one_dim" in exempt and param.ndim <= 1)
            or ("position" in exempt and _POSITION.fullmatch(name))
            or ("tokens" in exempt and _TOKENS.fullmatch(name))
        )
        add(part, param, layer_lr(layer), decay, is_backbone=True)

    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for _, param in _trainable(model.named_parameters()):
        if id(param) in backbone_ids:
            continue
        decay = not (
            ("one_dim" in exempt and param.ndim <= 1) or ("queries" in exempt and id(param) in embedding_ids)
        )
        add(HEADS, param, lr, decay, is_backbone=False)

    return list(groups.values())  # backbone order (embeddings, blocks, final norm), then heads


def _trainable(named: Iterable[tuple[str, nn.Parameter]]) -> Iterable[tuple[str, nn.Parameter]]:
    return ((name, param) for name, param in named if param.requires_grad)
