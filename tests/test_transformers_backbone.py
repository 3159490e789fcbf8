"""The 7B backbones on narrow stand-ins: Web-SSL DINO (a Transformers Dinov2Model built as EoMT's own blocks),
its pretrained weights and the release's EoMT-7B checkpoint layout against the real Transformers forward,
and timm's DINOv3-7B; the full-size presets on the meta device."""

import json

import huggingface_hub.constants
import pytest
import torch
import transformers
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_model_zoo import cache_repo

from eomt import api, model_zoo
from eomt.config import compose
from eomt.errors import ConfigError
from eomt.model import EoMT, build_model, load_checkpoint
from eomt.model.backbone import BackboneRunner, create_backbone
from eomt.model.pretrained import check_pretrained_reachable
from eomt.model.transformers_backbone import is_hub_backbone
from eomt.model.weight_formats import HF_DINOV2

WEBSSL = "facebook/webssl-dino7b-full8b-518"
# The Web-SSL 7B's block structure (SwiGLU, layer scale, no registers) at a width and depth a CPU runs.
NARROW = {
    "model_type": "dinov2",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "mlp_ratio": 4,
    "use_swiglu_ffn": True,
    "layerscale_value": 1e-5,
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,
    "patch_size": 16,
    "image_size": 64,  # a 4x4 position grid; the tests run at 96 px (6x6), so it is interpolated
}


def transformers_dinov2(**overrides) -> transformers.Dinov2Model:
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**{**NARROW, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lambda1"):  # trained layer scales, so that every block counts
                param.uniform_(0.5, 1.5)
    return model


def as_transformers_4(state: dict) -> dict:
    """Transformers 5's Dinov2Model keys in 4.x's names (what hub checkpoints and the release hold)."""
    names = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
        "mlp.down_proj": "mlp.weights_out",
    }
    out = {}
    for key, value in state.items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            up = state[key.replace("gate_proj", "up_proj")]
            out[key.replace("gate_proj", "weights_in")] = torch.cat((value, up))
            continue
        for new, old in names.items():
            key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


def run_backbone(vit, images):
    runner = BackboneRunner(vit)
    tokens, rope, _ = runner.embed(images)
    for i in range(len(vit.blocks)):
        tokens = runner.block(i, tokens, rope, 0, None)
    return vit.norm(tokens)


@pytest.mark.parametrize("key_names", ["transformers 5", "transformers 4"])
def test_pretrained_webssl_backbone_runs_as_the_transformers_model(tmp_path, key_names):
    reference = transformers_dinov2()
    state = reference.state_dict()
    save_file(
        as_transformers_4(state) if key_names == "transformers 4" else state, tmp_path / "model.safetensors"
    )
    (tmp_path / "config.json").write_text(json.dumps(NARROW))  # read from beside the weights

    vit = create_backbone(
        WEBSSL, (96, 96), 16, pretrained=True, pretrained_file=tmp_path / "model.safetensors"
    )

    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            run_backbone(vit, images), reference(pixel_values=images).last_hidden_state, atol=1e-5, rtol=1e-4
        )


def test_pretrained_webssl_backbone_loads_by_hub_name_from_sharded_files_in_the_cache(tmp_path, monkeypatch):
    """As the 7B repo is stored: safetensors shards and their index, read through the offline cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    state = as_transformers_4(transformers_dinov2().state_dict())
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = ["model.safetensors.index.json", *shards]
    cache_repo(tmp_path / "cache", WEBSSL, {name: tmp_path / name for name in files})

    check_pretrained_reachable(WEBSSL)  # cached: no error
    vit = create_backbone(WEBSSL, (64, 64), 16, pretrained=True, config=NARROW)
    torch.testing.assert_close(vit.blocks[3].mlp.fc1.weight, state["encoder.layer.3.mlp.weights_in.weight"])
    torch.testing.assert_close(vit.pos_embed, state["embeddings.position_embeddings"])  # same 4x4 grid


def release_checkpoint(reference, donor: EoMT) -> dict:
    """The release's EoMT-7B layout: the Dinov2Model renamed by its `transformers_to_timm` (embeddings ->
    patch_embed, layer -> blocks, no mask token), Transformers 4 names, the heads of `donor`."""
    state = {}
    for key, value in as_transformers_4(reference.state_dict()).items():
        for theirs, renamed in (("embeddings.", "patch_embed."), ("encoder.layer.", "blocks.")):
            key = renamed + key.removeprefix(theirs) if key.startswith(theirs) else key
        if key != "patch_embed.mask_token":
            state["network.encoder.backbone." + key] = value
    for key, value in donor.state_dict().items():
        if not key.startswith("backbone."):
            state["network." + key] = value
    state["network.attn_mask_probs"] = torch.zeros_like(donor.attn_mask_probs)  # end of training
    state["network.encoder.pixel_mean"] = donor.pixel_mean
    state["network.encoder.pixel_std"] = donor.pixel_std
    return state


def test_release_7b_checkpoint_gives_the_transformers_backbone_outputs(tmp_path):
    reference = transformers_dinov2()
    kwargs = dict(backbone=WEBSSL, img_size=96, num_classes=5, num_queries=7, num_blocks=2)
    torch.manual_seed(1)
    donor = EoMT(**kwargs, backbone_config=NARROW).eval()
    torch.save({"state_dict": release_checkpoint(reference, donor)}, tmp_path / "pytorch_model.bin")
    torch.manual_seed(2)
    network = EoMT(**kwargs, backbone_config=NARROW)
    load_checkpoint(network, tmp_path / "pytorch_model.bin")

    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        masks, classes = network.eval()(images)
        # The release's forward on the Transformers backbone: queries enter before block depth - num_blocks.
        tokens = reference.embeddings((images - donor.pixel_mean) / donor.pixel_std)
        for i, layer in enumerate(reference.encoder.layer):
            if i == NARROW["num_hidden_layers"] - 2:
                tokens = torch.cat((donor.q.weight.expand(2, -1, -1), tokens), dim=1)
            tokens = layer(tokens)
            tokens = tokens[0] if isinstance(tokens, tuple) else tokens  # Transformers 4 returns a tuple
        tokens = reference.layernorm(tokens)
        queries, patches = tokens[:, :7], tokens[:, 8:]
        pixels = donor.upscale(patches.transpose(1, 2).reshape(2, -1, 6, 6))
        expected_masks = torch.einsum("bqc,bchw->bqhw", donor.mask_head(queries), pixels)
        torch.testing.assert_close(masks[-1], expected_masks, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(classes[-1], donor.class_head(queries), atol=1e-4, rtol=1e-4)


def test_webssl_7b_preset_has_the_transformers_architecture():
    """The full-size preset on the meta device: every weight of the real Transformers Dinov2Model built
    from the yaml's config has the shape of ours (position and patch embedding: another grid and patch)."""
    cfg = compose(["experiment=coco_panoptic_webssl_vit_7b_640", "model.pretrained=false"])
    with torch.device("meta"):
        ours = build_model(cfg.model).backbone.state_dict()
        config = transformers.Dinov2Config(**OmegaConf.to_container(cfg.model.backbone_config))
        theirs = HF_DINOV2.to_ours(transformers.Dinov2Model(config).state_dict())
    assert not theirs.unplaced and not theirs.incomplete
    assert theirs.state.keys() == ours.keys()
    differ = {k for k in ours if ours[k].shape != theirs.state[k].shape}
    assert differ == {"pos_embed", "patch_embed.proj.weight"}
    assert ours["pos_embed"].shape[1] == 1 + 40 * 40 and theirs.state["pos_embed"].shape[1] == 1 + 37 * 37
    assert sum(v.numel() for v in ours.values()) > 6.4e9


def test_dinov3_7b_blocks_train_on_a_narrow_stand_in():
    narrow = [
        f"+model.backbone_kwargs.{k}={v}" for k, v in (("embed_dim", 64), ("depth", 6), ("num_heads", 2))
    ]
    cfg = compose(["experiment=coco_panoptic_dinov3_vit_7b_640", "model.pretrained=false", *narrow])
    cfg.model.img_size = [64, 64]
    network = build_model(cfg.model)
    masks, classes = network(torch.rand(1, 3, 64, 64))
    assert len(masks) == network.num_blocks + 1 == 6
    sum(m.mean() for m in masks).add(sum(c.mean() for c in classes)).backward()
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)
    assert network.backbone.blocks[0].gamma_1 is not None  # layer scale, as DINOv3-7B has


def test_release_7b_loads_by_name_with_its_preset(tmp_path, monkeypatch):
    """`checkpoint=tue-mps/coco_panoptic_eomt_7b_640` from the offline cache: its preset (640 px, 5 query
    blocks, 200 queries, 133 classes) with a narrow backbone, the weights at a 37x37 position grid."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    narrow = [f"model.backbone_config.{k}={NARROW[k]}" for k in ("hidden_size", "num_attention_heads")]
    narrow.append("model.backbone_config.num_hidden_layers=6")
    overrides = model_zoo.with_preset([*narrow, "checkpoint=tue-mps/coco_panoptic_eomt_7b_640"])
    assert "experiment=coco_panoptic_webssl_vit_7b_640" in overrides
    model_cfg = compose([o for o in overrides if not o.startswith("checkpoint=")]).model
    model_zoo.check_fits("tue-mps/coco_panoptic_eomt_7b_640", model_cfg)  # the preset is its network
    reference = transformers_dinov2(num_hidden_layers=6, image_size=37 * 16)
    donor = build_model({**OmegaConf.to_container(model_cfg, resolve=True), "pretrained": False})
    torch.save({"state_dict": release_checkpoint(reference, donor)}, tmp_path / "pytorch_model.bin")
    cache_repo(
        tmp_path / "cache",
        "tue-mps/coco_panoptic_eomt_7b_640",
        {"pytorch_model.bin": tmp_path / "pytorch_model.bin"},
    )

    loaded = api.load(narrow, checkpoint="tue-mps/coco_panoptic_eomt_7b_640")
    torch.testing.assert_close(loaded.class_head.weight, donor.class_head.weight)
    torch.testing.assert_close(loaded.backbone.norm.weight, reference.layernorm.weight)
    assert loaded.backbone.pos_embed.shape[1] == 1 + 40 * 40


def test_hub_backbone_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=f"{WEBSSL}.*HF_HUB_OFFLINE=1.*model.pretrained_file="):
        check_pretrained_reachable(WEBSSL)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json beside model.pretrained_file"):
        create_backbone(
            WEBSSL, (64, 64), 16, pretrained=True, pretrained_file=tmp_path / "weights.safetensors"
        )
    with pytest.raises(ConfigError, match="num_register_tokens"):
        create_backbone(WEBSSL, (64, 64), 16, pretrained=False, config={**NARROW, "num_register_tokens": 4})
    assert not is_hub_backbone("hf-hub:timm/vit_small_patch14_reg4_dinov2.lvd142m")  # timm's own hub names
    with pytest.raises(ConfigError, match="model.backbone_config=null"):
        create_backbone("vit_small_patch14_reg4_dinov2", (64, 64), 16, pretrained=False, config=NARROW)
