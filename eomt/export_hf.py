"""Write an EoMT network in the Transformers layout: config.json + model.safetensors, loadable with
`EomtForUniversalSegmentation.from_pretrained` (DINOv2 backbones) or
`EomtDinov3ForUniversalSegmentation.from_pretrained` (DINOv3 backbones, the `_qkvb` timm variants).

    python -m eomt.export_hf --checkpoint outputs/run/last.pt --out hf_model model=vit_l dataset=coco

Transformers' EoMT takes square inputs and normalised pixels (its image processor normalises).
"""

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.layers import GluMlp, LayerScale, Mlp
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eomt.api import load
from eomt.errors import UserError, user_errors
from eomt.model.eomt import EoMT
from eomt.model.weight_formats import HF_EOMT_DINOV3, HF_EOMT_MLP, HF_EOMT_SWIGLU, Layout


class ExportError(UserError, ValueError):
    """The network has no exact counterpart in Transformers."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ExportError(message)


def _common(model: EoMT) -> dict:
    backbone = model.backbone
    height, width = model.img_size
    patch_h, patch_w = backbone.patch_embed.patch_size
    _require(
        height == width,
        f"Transformers EoMT takes square inputs: export with model.img_size=[{height},{height}]",
    )
    _require(patch_h == patch_w, f"Transformers EoMT needs square patches, got {patch_h}x{patch_w}")
    _require(backbone.cls_token is not None, "Transformers EoMT needs a backbone with a class token")
    return dict(
        hidden_size=backbone.embed_dim,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=backbone.blocks[0].attn.num_heads,
        hidden_act="gelu",
        layer_norm_eps=backbone.norm.eps,
        image_size=height,
        patch_size=patch_h,
        num_upscale_blocks=len(model.upscale),
        num_blocks=model.num_blocks,
        num_queries=model.num_queries,
        num_register_tokens=backbone.num_prefix_tokens - 1,
        num_labels=model.num_classes,
    )


def _swiglu_mlp_ratio(dim: int, hidden: int) -> int:
    """The integer mlp_ratio for which Transformers' SwiGLU hidden size equals `hidden`."""
    for ratio in range(1, 17):
        if (int(dim * ratio * 2 / 3) + 7) // 8 * 8 == hidden:
            return ratio
    raise ExportError(f"SwiGLU hidden size {hidden} for dim {dim} matches no Transformers mlp_ratio")


def _dinov2_config(model: EoMT) -> tuple[object, Layout]:
    from transformers import EomtConfig

    backbone = model.backbone
    block = backbone.blocks[0]
    _require(
        backbone.no_embed_class and backbone.pos_embed is not None,
        "Transformers EoMT needs position embeddings on patches only (DINOv2 style, no_embed_class)",
    )
    _require(isinstance(block.ls1, LayerScale), "Transformers EoMT needs layer scale (timm init_values)")
    _require(isinstance(block.attn.q_norm, nn.Identity), "Transformers EoMT has no q/k norm")
    fc1 = block.mlp.fc1
    if isinstance(block.mlp, GluMlp):
        _require(
            not block.mlp.gate_last and isinstance(block.mlp.act, nn.SiLU), "only SwiGLUPacked MLPs export"
        )
        swiglu, mlp_ratio = True, _swiglu_mlp_ratio(backbone.embed_dim, fc1.out_features // 2)
    else:
        _require(isinstance(block.mlp, Mlp) and isinstance(block.mlp.act, nn.GELU), "only GELU MLPs export")
        _require(
            fc1.out_features % backbone.embed_dim == 0, "the MLP width must be an integer multiple of dim"
        )
        swiglu, mlp_ratio = False, fc1.out_features // backbone.embed_dim
    config = EomtConfig(**_common(model), mlp_ratio=mlp_ratio, use_swiglu_ffn=swiglu)
    return config, HF_EOMT_SWIGLU if swiglu else HF_EOMT_MLP


def _dinov3_config(model: EoMT) -> tuple[object, Layout]:
    from transformers import EomtDinov3Config

    backbone = model.backbone
    attn = backbone.blocks[0].attn
    mlp = backbone.blocks[0].mlp
    _require(
        isinstance(backbone.rope, RotaryEmbeddingDinoV3) and backbone.rope.rotate_half,
        "Transformers EoMT-DINOv3 needs a DINOv3 rotary embedding (timm vit_*_patch16_dinov3*)",
    )
    _require(backbone.pos_embed is None, "Transformers EoMT-DINOv3 has no absolute position embedding")
    _require(isinstance(mlp, Mlp) and isinstance(mlp.act, nn.GELU), "only GELU MLPs export to EoMT-DINOv3")
    _require(attn.qkv is not None, "only fused-qkv DINOv3 attention exports")
    has_qv_bias = attn.q_bias is not None
    config = EomtDinov3Config(
        **_common(model),
        intermediate_size=mlp.fc1.out_features,
        rope_parameters={"rope_type": "default", "rope_theta": float(backbone.rope.temperature)},
        query_bias=has_qv_bias,
        key_bias=False,
        value_bias=has_qv_bias,
        proj_bias=attn.proj.bias is not None,
        mlp_bias=mlp.fc1.bias is not None,
        use_gated_mlp=False,
        pos_embed_shift=backbone.rope.shift_coords,  # train-time rope grid augmentations
        pos_embed_jitter=backbone.rope.jitter_coords,
        pos_embed_rescale=backbone.rope.rescale_coords,
    )
    return config, HF_EOMT_DINOV3


EXPORTERS: dict[type, Callable[[EoMT], tuple[object, Layout]]] = {
    VisionTransformer: _dinov2_config,
    Eva: _dinov3_config,
}


def export_hf(model: EoMT, out_dir: str | Path) -> Path:
    """Write `model` to `out_dir` in the Transformers EoMT layout; returns the directory."""
    exporter = next((EXPORTERS[c] for c in type(model.backbone).__mro__ if c in EXPORTERS), None)
    _require(
        exporter is not None, f"no Transformers EoMT counterpart for backbone {type(model.backbone).__name__}"
    )
    config, layout = exporter(model)
    state = layout.from_ours({k: v.detach().cpu() for k, v in model.state_dict().items()})
    empty_weight = torch.ones(model.num_classes + 1)
    empty_weight[-1] = config.no_object_weight
    state["criterion.empty_weight"] = empty_weight
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="our, the authors' or a Transformers checkpoint")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides describing the network, e.g. model=vit_l"
    )
    args = parser.parse_args(argv)
    out = export_hf(load(args.overrides, checkpoint=args.checkpoint), args.out)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")


if __name__ == "__main__":
    with user_errors():
        main()
