"""A backbone named by its Transformers hub repo (`model.backbone=facebook/webssl-dino7b-full8b-518`), built
as a timm VisionTransformer from its Transformers config, so that EoMT runs it with its own blocks.

Transformers' Dinov2Model (DINOv2, Web-SSL DINO) is a timm VisionTransformer under other names: pre-norm
blocks with layer scale, a GELU MLP or a SwiGLU FFN, a class token with a learned position embedding and
no registers. `vit_kwargs` turns its config.json values (`model.backbone_config`, else the repo's
config.json) into timm's constructor arguments. The pretrained weights (the hub repo, or
`model.pretrained_file`) are read in Transformers' layout through the key table
`eomt.model.weight_formats.HF_DINOV2`; the patch embedding is resampled to the network's patch size as timm
does for its own DINOv2 weights, the position embedding to the network's grid as the Transformers model
does at every forward. Transformers itself is not needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from timm.layers import SwiGLUPacked, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eomt.errors import CheckpointError, ConfigError
from eomt.model.weight_formats import HF_DINOV2, key_differences, read_tensors, resample_position_embedding


def is_hub_backbone(name: str) -> bool:
    """Whether `model.backbone` names a Transformers hub repo (org/name) rather than a timm model (a timm
    name has no slash, or a scheme: `hf-hub:org/name`)."""
    return "/" in name and ":" not in name


def transformers_config(
    backbone: str, config: Mapping | None, pretrained_file: str | Path | None
) -> dict[str, Any]:
    """The backbone's Transformers config values: `config` when given, else the config.json beside
    `pretrained_file`, else the hub repo's config.json (through the Hugging Face cache)."""
    if config is not None:
        return dict(config)
    if pretrained_file is not None:
        local = Path(pretrained_file)
        path = (local if local.is_dir() else local.parent) / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"model.backbone={backbone}: no config.json beside model.pretrained_file={pretrained_file}; "
                "put the repo's config.json there, or its values under model.backbone_config"
            )
        return json.loads(path.read_text())
    from eomt.model_zoo import download_file

    path = download_file(f"hf://{backbone}", "config.json")
    if path is None:
        raise ConfigError(
            f"model.backbone={backbone}: its config.json is neither in the Hugging Face cache nor "
            "downloadable; give its values under model.backbone_config (conf/model/webssl_vit_7b.yaml shows how)"
        )
    return json.loads(path.read_text())


def vit_kwargs(config: Mapping) -> dict[str, Any]:
    """timm VisionTransformer arguments that build the architecture of a Transformers Dinov2Config."""
    model_type = config.get("model_type", "dinov2")
    if model_type != "dinov2":
        raise ConfigError(
            f"model.backbone_config.model_type={model_type}: only Transformers Dinov2 backbones are built "
            "from a hub config; use a timm model name for the others"
        )
    if config.get("num_register_tokens", 0):
        raise ConfigError(
            "model.backbone_config.num_register_tokens: Dinov2WithRegisters is not supported; "
            "use a timm `*_reg4_dinov2` backbone"
        )
    dim = int(config["hidden_size"])
    hidden = int(dim * config.get("mlp_ratio", 4))
    if config.get("use_swiglu_ffn", False):
        # Transformers keeps two thirds of the hidden size, rounded up to a multiple of 8; timm's
        # SwiGLUPacked holds gate and up in one fc1 of twice that size.
        hidden = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)
        mlp = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
    elif config.get("hidden_act", "gelu") == "gelu":
        mlp = {"act_layer": nn.GELU}
    else:
        raise ConfigError(
            f"model.backbone_config.hidden_act={config['hidden_act']}: only gelu (or use_swiglu_ffn) is supported"
        )
    return {
        "embed_dim": dim,
        "depth": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "mlp_ratio": (hidden + 0.5) / dim,  # timm takes int(dim * mlp_ratio): exactly `hidden`
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "init_values": float(config.get("layerscale_value", 1.0)),
        "norm_layer": partial(nn.LayerNorm, eps=float(config.get("layer_norm_eps", 1e-6))),
        "class_token": True,
        "reg_tokens": 0,
        "no_embed_class": False,  # the class token has a position, as in Dinov2Embeddings
        **mlp,
    }


def create_transformers_backbone(
    backbone: str,
    img_size: tuple[int, int],
    patch_size: int,
    pretrained: bool,
    pretrained_file: str | Path | None = None,
    config: Mapping | None = None,
    **kwargs: Any,
) -> VisionTransformer:
    """The Transformers backbone `backbone` as a timm VisionTransformer at `img_size` / `patch_size`, without
    classifier; with its pretrained weights (the hub repo's, or `pretrained_file`) when `pretrained`."""
    options = {**vit_kwargs(transformers_config(backbone, config, pretrained_file)), **kwargs}
    vit = VisionTransformer(
        img_size=img_size, patch_size=patch_size, num_classes=0, global_pool="", **options
    )
    if pretrained:
        if pretrained_file is None:
            from eomt.model_zoo import download

            pretrained_file = download(f"hf://{backbone}")
        load_pretrained(vit, Path(pretrained_file), backbone)
    return vit


def load_pretrained(vit: VisionTransformer, path: Path, backbone: str) -> None:
    """Transformers Dinov2Model weights at `path` (file, sharded index or folder) into `vit`."""
    converted = HF_DINOV2.to_ours(read_tensors(path))
    state = converted.state
    if "patch_embed.proj.weight" in state:
        size = tuple(vit.patch_embed.proj.weight.shape[-2:])
        if tuple(state["patch_embed.proj.weight"].shape[-2:]) != size:
            state["patch_embed.proj.weight"] = resample_patch_embed(
                state["patch_embed.proj.weight"], list(size), verbose=False
            )
    if "pos_embed" in state:
        state["pos_embed"] = resample_position_embedding(state["pos_embed"], vit.patch_embed.grid_size)
    mismatched, missing, unexpected = key_differences(state, vit.state_dict(), converted)
    differ = [f"{k} missing" for k in missing] + [f"{k} unexpected" for k in unexpected] + mismatched
    if differ:
        raise CheckpointError(
            f"{path} ({HF_DINOV2.name}) does not fit model.backbone={backbone}: {len(differ)} keys differ, "
            f"first {differ[0]}; make model.backbone_config the repo's config.json"
        )
    vit.load_state_dict(state)
