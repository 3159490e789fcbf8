"""Load EoMT weights from our checkpoints, the authors' releases and Transformers checkpoints.

The layout is recognised from the keys; no user conversion:

- ours: a trainer checkpoint `{"model": state_dict, ...}`, a sharded one (a `step_N/` directory: eomt.sharded)
  or a bare EoMT state dict.
- the authors' released `pytorch_model.bin` (state dict possibly under "state_dict"), keys under `network.`:
  - DINOv2 models keep timm's backbone keys (`network.encoder.backbone.blocks.0.attn.qkv.weight`);
  - the 7B model (Web-SSL DINO) keeps the Transformers Dinov2Model layout of its backbone, renamed as the
    release's `transformers_to_timm` does (`embeddings` -> `patch_embed`, `layer` -> `blocks`), with the
    position embedding at the pretrained grid: it is resampled to the network's grid as Transformers does
    at every forward, so the outputs are the authors';
  - DINOv3 models keep the Transformers DINOv3 backbone layout
    (`network.encoder.backbone.patch_embed.patch_embeddings.weight`, `...blocks.0.attention.q_proj.weight`)
    and store the backbone as a *delta* from the pretrained DINOv3 weights (checkpoint = backbone + delta).
    The authors published every DINOv3 model that way, so that layout is what marks a delta checkpoint.
    Loading one needs the network built with its pretrained backbone (`model.pretrained=true`, offline
    with `model.pretrained_file=...`) and the `_qkvb` timm variant (the deltas train q/v biases).
- Transformers: `EomtForUniversalSegmentation` (DINOv2, `embeddings.patch_embeddings.projection.weight`)
  or `EomtDinov3ForUniversalSegmentation` (`embeddings.patch_embeddings.weight`): a directory written by
  `save_pretrained` (safetensors or bin, sharded or not) or one weights file.

External layouts are tables of key templates (`{i}`: a block index, `{p}`: weight/bias, `{rest}`: any
suffix) read in both directions, so the Transformers exporter uses the same tables.
"""

import json
import math
import pickle
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from eomt import sharded
from eomt.errors import CheckpointError

_PLACEHOLDERS = {"i": r"\d+", "p": r"weight|bias", "rest": r".+"}


@cache
def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, value in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(f"{{{name}}}"), f"(?P<{name}>{value})")
    return re.compile(pattern)


def _fill(template: str, match: re.Match) -> str:
    return template.format(**match.groupdict())


@dataclass(frozen=True)
class KeyRule:
    """One external key template <-> one of our key templates.

    part/parts: the external tensor is slice `part` of `parts` equal slices (dim 0) of ours, e.g. q/k/v of
    a fused qkv. squeeze: the external tensor lacks our leading singleton dimension.
    """

    external: str
    ours: str
    part: int = 0
    parts: int = 1
    squeeze: bool = False


def _nest(rules: Iterable[KeyRule], external_prefix: str, ours_prefix: str) -> tuple[KeyRule, ...]:
    return tuple(
        KeyRule(external_prefix + r.external, ours_prefix + r.ours, r.part, r.parts, r.squeeze) for r in rules
    )


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: how its keys map to ours, which keys EoMT has no use for, whether the
    backbone is stored relative to the pretrained backbone, and whether its position embedding is at
    the grid the backbone was pretrained at (the model resampled it at run time)."""

    name: str
    rules: tuple[KeyRule, ...]
    ignored: tuple[str, ...] = ()
    backbone_is_delta: bool = False
    position_embedding_at_source_grid: bool = False  # resampled to the network's grid on load

    def ignores(self, key: str) -> bool:
        return any(_template_regex(t).fullmatch(key) for t in self.ignored)

    def to_ours(self, state: Mapping[str, Tensor]) -> "Converted":
        """Our state dict from one in this layout."""
        converted = Converted()
        slices: dict[str, dict[int, Tensor]] = defaultdict(dict)
        num_slices: dict[str, int] = {}
        for key, value in state.items():
            if self.ignores(key):
                continue
            placed = False
            for rule in self.rules:
                match = _template_regex(rule.external).fullmatch(key)
                if match is None:
                    continue
                ours = _fill(rule.ours, match)
                tensor = value.unsqueeze(0) if rule.squeeze else value
                if rule.parts == 1:
                    converted.state[ours] = tensor
                else:
                    slices[ours][rule.part] = tensor
                    num_slices[ours] = rule.parts
                placed = True
                break
            if not placed:
                converted.unplaced.append(key)
        for ours, pieces in slices.items():
            if len(pieces) == num_slices[ours]:
                converted.state[ours] = torch.cat([pieces[i] for i in range(len(pieces))], dim=0)
            else:
                converted.incomplete.append(f"{ours} ({len(pieces)} of {num_slices[ours]} slices)")
        return converted

    def from_ours(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A state dict in this layout from ours; every key must have a place."""
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            targets = [
                (rule, match)
                for rule in self.rules
                if (match := _template_regex(rule.ours).fullmatch(key)) is not None
            ]
            if not targets:
                raise CheckpointError(
                    f"{key} has no place in the {self.name} layout: this network cannot be exported to it"
                )
            if len(targets) > 1 and any(rule.parts == 1 for rule, _ in targets):
                raise CheckpointError(
                    f"{key} maps to several {self.name} keys: the layout table is ambiguous"
                )
            for rule, match in targets:
                tensor = value.chunk(rule.parts, dim=0)[rule.part] if rule.parts > 1 else value
                out[_fill(rule.external, match)] = (
                    tensor.squeeze(0) if rule.squeeze else tensor
                ).contiguous()
        return out


@dataclass
class Converted:
    state: dict[str, Tensor] = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)  # external keys no rule maps
    incomplete: list[str] = field(default_factory=list)  # our fused tensors with slices missing


# Transformers' EomtLayer (DINOv2) <-> timm vision_transformer.Block.
_HF_DINOV2_LAYER = (
    KeyRule("norm1.{p}", "norm1.{p}"),
    KeyRule("attention.q_proj.{p}", "attn.qkv.{p}", 0, 3),
    KeyRule("attention.k_proj.{p}", "attn.qkv.{p}", 1, 3),
    KeyRule("attention.v_proj.{p}", "attn.qkv.{p}", 2, 3),
    KeyRule("attention.out_proj.{p}", "attn.proj.{p}"),
    KeyRule("layer_scale1.lambda1", "ls1.gamma"),
    KeyRule("norm2.{p}", "norm2.{p}"),
    KeyRule("layer_scale2.lambda1", "ls2.gamma"),
)
_HF_DINOV2_MLP = (KeyRule("mlp.fc1.{p}", "mlp.fc1.{p}"), KeyRule("mlp.fc2.{p}", "mlp.fc2.{p}"))
# timm's SwiGLUPacked fc1 holds [gate | up]; the gate half goes through SiLU.
_HF_DINOV2_SWIGLU = (
    KeyRule("mlp.gate_proj.{p}", "mlp.fc1.{p}", 0, 2),
    KeyRule("mlp.up_proj.{p}", "mlp.fc1.{p}", 1, 2),
    KeyRule("mlp.down_proj.{p}", "mlp.fc2.{p}"),
)

# The Transformers DINOv3 layer (used by the authors' DINOv3 releases too) <-> timm EvaBlock (`_qkvb`).
_DINOV3_LAYER = (
    KeyRule("norm1.{p}", "norm1.{p}"),
    KeyRule("attention.q_proj.weight", "attn.qkv.weight", 0, 3),
    KeyRule("attention.k_proj.weight", "attn.qkv.weight", 1, 3),
    KeyRule("attention.v_proj.weight", "attn.qkv.weight", 2, 3),
    KeyRule("attention.q_proj.bias", "attn.q_bias"),
    KeyRule("attention.v_proj.bias", "attn.v_bias"),
    KeyRule("attention.o_proj.{p}", "attn.proj.{p}"),
    KeyRule("layer_scale1.lambda1", "gamma_1"),
    KeyRule("norm2.{p}", "norm2.{p}"),
    KeyRule("mlp.up_proj.{p}", "mlp.fc1.{p}"),
    KeyRule("mlp.down_proj.{p}", "mlp.fc2.{p}"),
    KeyRule("layer_scale2.lambda1", "gamma_2"),
)

# Transformers' Dinov2Layer <-> timm vision_transformer.Block: the EomtLayer's rules with Dinov2's o_proj
# (Transformers 5, what Dinov2Model.state_dict() gives), and 4.x's names (what hub checkpoints hold).
_HF_DINOV2_BLOCK = (
    *(rule for rule in _HF_DINOV2_LAYER if not rule.external.startswith("attention.out_proj")),
    KeyRule("attention.o_proj.{p}", "attn.proj.{p}"),
    *(
        KeyRule(f"attention.attention.{name}.{{p}}", "attn.qkv.{p}", part, 3)
        for part, name in enumerate(("query", "key", "value"))
    ),
    KeyRule("attention.output.dense.{p}", "attn.proj.{p}"),
    KeyRule("mlp.weights_in.{p}", "mlp.fc1.{p}"),  # 4.x SwiGLU: [gate | up] in one, as timm's SwiGLUPacked
    KeyRule("mlp.weights_out.{p}", "mlp.fc2.{p}"),
)


def _hf_dinov2_backbone(embeddings: str, blocks: str, norms: tuple[str, ...]) -> tuple[KeyRule, ...]:
    """A Transformers Dinov2Model (no registers) <-> timm VisionTransformer, under the given prefixes."""
    return (
        KeyRule(embeddings + "cls_token", "cls_token"),
        KeyRule(embeddings + "position_embeddings", "pos_embed"),
        KeyRule(embeddings + "patch_embeddings.projection.{p}", "patch_embed.proj.{p}"),
        *_nest(_HF_DINOV2_BLOCK + _HF_DINOV2_MLP + _HF_DINOV2_SWIGLU, blocks + "{i}.", "blocks.{i}."),
        *(KeyRule(norm + ".{p}", "norm.{p}") for norm in norms),
    )


_HF_HEADS = (
    KeyRule("query.weight", "q.weight"),
    KeyRule("class_predictor.{p}", "class_head.{p}"),
    KeyRule("mask_head.fc1.{p}", "mask_head.0.{p}"),
    KeyRule("mask_head.fc2.{p}", "mask_head.2.{p}"),
    KeyRule("mask_head.fc3.{p}", "mask_head.4.{p}"),
    KeyRule("upscale_block.block.{i}.conv1.{p}", "upscale.{i}.conv1.{p}"),
    KeyRule("upscale_block.block.{i}.conv2.{p}", "upscale.{i}.conv2.{p}"),
    KeyRule("upscale_block.block.{i}.layernorm2d.{p}", "upscale.{i}.norm.{p}"),
    KeyRule("attn_mask_probs", "attn_mask_probs"),
)

_AUTHORS_HEADS = (
    KeyRule("network.q.weight", "q.weight"),
    KeyRule("network.class_head.{p}", "class_head.{p}"),
    KeyRule("network.mask_head.{rest}", "mask_head.{rest}"),
    KeyRule("network.upscale.{rest}", "upscale.{rest}"),
    KeyRule("network.attn_mask_probs", "attn_mask_probs"),
)
_AUTHORS_IGNORED = ("network.encoder.pixel_mean", "network.encoder.pixel_std", "criterion.{rest}")


def _hf_eomt_layout(mlp_rules: tuple[KeyRule, ...]) -> Layout:
    return Layout(
        name="Transformers EomtForUniversalSegmentation",
        rules=(
            KeyRule("embeddings.cls_token", "backbone.cls_token"),
            KeyRule("embeddings.register_tokens", "backbone.reg_token"),
            KeyRule("embeddings.position_embeddings.weight", "backbone.pos_embed", squeeze=True),
            KeyRule("embeddings.patch_embeddings.projection.{p}", "backbone.patch_embed.proj.{p}"),
            KeyRule("layernorm.{p}", "backbone.norm.{p}"),
            *_nest(_HF_DINOV2_LAYER + mlp_rules, "layers.{i}.", "backbone.blocks.{i}."),
            *_HF_HEADS,
        ),
        ignored=("criterion.{rest}",),
    )


HF_EOMT = _hf_eomt_layout(_HF_DINOV2_MLP + _HF_DINOV2_SWIGLU)
HF_EOMT_MLP = _hf_eomt_layout(_HF_DINOV2_MLP)  # for export: one target per key
HF_EOMT_SWIGLU = _hf_eomt_layout(_HF_DINOV2_SWIGLU)

HF_EOMT_DINOV3 = Layout(
    name="Transformers EomtDinov3ForUniversalSegmentation",
    rules=(
        KeyRule("embeddings.cls_token", "backbone.cls_token"),
        KeyRule("embeddings.register_tokens", "backbone.reg_token"),
        KeyRule("embeddings.patch_embeddings.{p}", "backbone.patch_embed.proj.{p}"),
        KeyRule("layernorm.{p}", "backbone.norm.{p}"),
        *_nest(_DINOV3_LAYER, "layers.{i}.", "backbone.blocks.{i}."),
        *_HF_HEADS,
    ),
    ignored=("criterion.{rest}", "embeddings.mask_token"),
)

_AUTHORS_BACKBONE = "network.encoder.backbone."  # the release keeps its backbone under this
AUTHORS_DINOV2 = Layout(
    name="authors' EoMT release (DINOv2)",
    rules=(KeyRule(_AUTHORS_BACKBONE + "{rest}", "backbone.{rest}"), *_AUTHORS_HEADS),
    ignored=_AUTHORS_IGNORED,
)

# A Transformers Dinov2Model's own weights (e.g. facebook/webssl-dino7b-full8b-518): a backbone, not EoMT.
HF_DINOV2 = Layout(
    name="Transformers Dinov2Model",
    rules=_hf_dinov2_backbone("embeddings.", "encoder.layer.", ("layernorm",)),
    ignored=("embeddings.mask_token",),
    position_embedding_at_source_grid=True,
)

# The release's EoMT-7B: the Dinov2Model renamed by `transformers_to_timm`; its final norm keeps
# Transformers' name (`layernorm`) or timm's (`norm`).
AUTHORS_HF_DINOV2 = Layout(
    name="authors' EoMT release (Transformers Dinov2 backbone)",
    rules=(
        *_nest(
            _hf_dinov2_backbone("patch_embed.", "blocks.", ("layernorm", "norm")),
            _AUTHORS_BACKBONE,
            "backbone.",
        ),
        *_AUTHORS_HEADS,
    ),
    ignored=(*_AUTHORS_IGNORED, _AUTHORS_BACKBONE + "patch_embed.mask_token"),
    position_embedding_at_source_grid=True,
)

AUTHORS_DINOV3_DELTA = Layout(
    name="authors' EoMT release (DINOv3, backbone as delta)",
    rules=(
        KeyRule(_AUTHORS_BACKBONE + "patch_embed.cls_token", "backbone.cls_token"),
        KeyRule(_AUTHORS_BACKBONE + "patch_embed.register_tokens", "backbone.reg_token"),
        KeyRule(_AUTHORS_BACKBONE + "patch_embed.patch_embeddings.{p}", "backbone.patch_embed.proj.{p}"),
        KeyRule(_AUTHORS_BACKBONE + "norm.{p}", "backbone.norm.{p}"),
        *_nest(_DINOV3_LAYER, _AUTHORS_BACKBONE + "blocks.{i}.", "backbone.blocks.{i}."),
        *_AUTHORS_HEADS,
    ),
    ignored=(*_AUTHORS_IGNORED, _AUTHORS_BACKBONE + "patch_embed.mask_token"),
    backbone_is_delta=True,
)

OURS = Layout(name="eomt", rules=(KeyRule("{rest}", "{rest}"),))


def detect_layout(state: Mapping[str, Tensor]) -> Layout | None:
    """The layout of a state dict, from its keys; None when it is none we know."""
    if "network.q.weight" in state:
        if _AUTHORS_BACKBONE + "patch_embed.patch_embeddings.weight" in state:
            return AUTHORS_DINOV3_DELTA
        if _AUTHORS_BACKBONE + "patch_embed.patch_embeddings.projection.weight" in state:
            return AUTHORS_HF_DINOV2
        return AUTHORS_DINOV2
    if "class_predictor.weight" in state:
        if "embeddings.patch_embeddings.projection.weight" in state:
            return HF_EOMT
        if "embeddings.patch_embeddings.weight" in state:
            return HF_EOMT_DINOV3
        return None
    if "q.weight" in state and "class_head.weight" in state:
        return OURS
    return None


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _weights_file(directory: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}")


def read_tensors(path: Path) -> Mapping:
    """The tensors of a weights file, a sharded index (`*.index.json`), a folder holding either, or a
    training run's sharded `step_N/` directory (trainer.strategy=fsdp)."""
    if sharded.is_sharded(path):
        return sharded.model_state(path)
    if path.is_dir():
        path = _weights_file(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        merged: dict[str, Tensor] = {}
        for shard in shards:
            merged.update(read_tensors(path.parent / shard))
        return merged
    if path.suffix == ".safetensors":
        return load_file(path)
    return load_weights_only(path)


def load_weights_only(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` on the CPU; a file it cannot use raises a one-line CheckpointError.

    The message tells apart a file that cannot be parsed (truncated, empty, zero-filled, another
    format) from one that parses but holds Python objects, which weights-only loading refuses.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:
        refused = _REFUSED_OBJECT.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
        if refused:
            raise CheckpointError(
                f"{path} contains Python objects that weights-only loading refuses ({refused.group(1)}); "
                "save a plain state dict of tensors (torch.save(model.state_dict(), ...))"
            ) from error
        raise CheckpointError(
            f"{path} is unreadable or not a PyTorch checkpoint ({type(error).__name__}); it may be "
            "truncated or damaged: save or download it again"
        ) from error


_REFUSED_OBJECT = re.compile(r"Unsupported global: GLOBAL (\S+)")  # torch's words for a refused class


def _unwrap(obj: Mapping) -> Mapping:
    for wrapper in ("model", "state_dict"):  # ours / the authors' (Lightning-style)
        if isinstance(obj.get(wrapper), Mapping):
            return obj[wrapper]
    return obj


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read from disk, its layout recognised, not yet applied to a network."""

    path: Path
    layout: Layout
    state: Mapping[str, Tensor]

    @property
    def needs_pretrained_backbone(self) -> bool:
        return self.layout.backbone_is_delta


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read the weights at `path` (file or Transformers directory) and recognise their layout."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: fix the path")
    obj = read_tensors(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = _unwrap(obj)
    layout = detect_layout(state)
    if layout is None:
        first = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"{path}: unrecognised checkpoint (first keys: {first}); expected ours, the authors' "
            "pytorch_model.bin or a Transformers EoMT checkpoint"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries {not_tensors[:5]} are not tensors; not a state dict")
    return LoadedCheckpoint(path, layout, state)


def resample_position_embedding(pos: Tensor, grid: Sequence[int]) -> Tensor:
    """A (1, 1 + s*s, D) position embedding (class token first, square grid) at the patch grid `grid`, as
    Transformers' Dinov2 interpolates it at every forward on another input size: bicubic in float32,
    align_corners=False, no antialiasing."""
    source = math.isqrt(pos.shape[1] - 1)
    if source * source != pos.shape[1] - 1:
        raise CheckpointError(
            f"a position embedding of {pos.shape[1]} positions is not a class token and a square grid"
        )
    if (source, source) == tuple(grid):
        return pos
    patches = pos[:, 1:].reshape(1, source, source, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat((pos[:, :1], patches), dim=1)


def _is_class_head(key: str) -> bool:
    return key.startswith("class_head.")


def key_differences(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    converted: Converted,
    kept: Callable[[str], bool] = lambda key: True,
) -> tuple[list[str], list[str], list[str]]:
    """How converted weights `state` differ from a network's `expected` state dict: (shape mismatches,
    missing keys, unexpected keys), each entry a description; `kept`: the network keys that must be there."""
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in state and kept(k)]
    missing += [f"{k} (in checkpoint, incomplete)" for k in converted.incomplete]
    unexpected = [k for k in state if k not in expected]
    unexpected += [f"{k} (checkpoint key with no place in EoMT)" for k in converted.unplaced]
    return mismatched, missing, unexpected


def load_checkpoint(
    model: nn.Module, checkpoint: str | Path | LoadedCheckpoint, skip_class_head: bool = False
) -> None:
    """Load weights in any recognised layout into `model`, or raise a one-line CheckpointError counting
    the missing keys, unexpected keys and shape mismatches and naming the first. skip_class_head: keep the model's class head
    (fine-tuning on another label set)."""
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else read_checkpoint(checkpoint)
    converted = ckpt.layout.to_ours(ckpt.state)
    state = converted.state
    expected = model.state_dict()
    if ckpt.layout.position_embedding_at_source_grid and "backbone.pos_embed" in state:
        grid = model.backbone.patch_embed.grid_size
        state["backbone.pos_embed"] = resample_position_embedding(state["backbone.pos_embed"], grid)
    if skip_class_head:
        state = {k: v for k, v in state.items() if not _is_class_head(k)}

    kept = (lambda k: not _is_class_head(k)) if skip_class_head else (lambda k: True)
    mismatched, missing, unexpected = key_differences(state, expected, converted, kept)
    differ = (
        mismatched
        + [f"{k} missing from checkpoint" for k in missing]
        + [f"{k} unexpected in checkpoint" for k in unexpected]
    )
    if differ:
        hint = ""
        if any(k.endswith(("attn.q_bias", "attn.v_bias")) for k in unexpected):
            hint = "; it has q/v biases: use the `_qkvb` timm DINOv3 backbone"
        raise CheckpointError(
            f"{ckpt.path} ({ckpt.layout.name}) does not fit this network: {len(differ)} keys differ "
            f"({len(mismatched)} shapes, {len(missing)} missing, {len(unexpected)} unexpected), first "
            f"{differ[0]}; pass its run directory as checkpoint= (its config.yaml builds the network), or "
            f"the overrides it was trained with (model=..., model.num_queries, model.num_classes, "
            f"model.img_size, ...){hint}"
        )

    if ckpt.layout.backbone_is_delta:
        if not getattr(model, "backbone_pretrained", False):
            raise CheckpointError(
                f"{ckpt.path} stores the backbone as a delta from the pretrained DINOv3 weights: build the "
                "network with model.pretrained=true (offline: model.pretrained_file=<dinov3 weights>)"
            )
        state = {
            k: (expected[k].float() + v.float()).to(expected[k].dtype) if k.startswith("backbone.") else v
            for k, v in state.items()
        }
    model.load_state_dict(state, strict=not skip_class_head)
