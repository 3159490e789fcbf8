import pytest
import torch
import transformers
from conftest import HF_DIMS, authors_release_state
from safetensors.torch import save_file

from eomt.export_hf import export_hf
from eomt.model import CheckpointError, EoMT, load_checkpoint, read_checkpoint
from eomt.model.weight_formats import AUTHORS_DINOV3_DELTA

LAYER_SCALE_NAMES = {"gamma", "gamma_1", "gamma_2", "lambda1"}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights of a trained-looking scale: norms and layer scales near 1, fan-in scaled matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            for name, param in owner.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                near_one = name in LAYER_SCALE_NAMES or (
                    isinstance(owner, torch.nn.LayerNorm) and name == "weight"
                )
                if near_one:
                    param.copy_(1 + 0.1 * noise)
                elif param.ndim >= 2 and "token" not in name:
                    param.copy_(noise / param[0].numel() ** 0.5)
                else:
                    param.copy_(0.1 * noise)


def _outputs(model: EoMT, images: torch.Tensor, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    model.masked_attn = masked
    model.attn_mask_probs.fill_(1.0)
    with torch.no_grad():
        mask_logits, class_logits = model(images)
    return mask_logits[-1], class_logits[-1]


def _hf_outputs(hf_model, images: torch.Tensor, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers masks whenever a probability is > 0; its inputs are normalised outside the model."""
    hf_model.eval()
    hf_model.attn_mask_probs.fill_(1.0 if masked else 0.0)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = hf_model(pixel_values=(images - mean) / std)
    return out.masks_queries_logits, out.class_queries_logits


def _assert_parity(ours, hf_model, masked: bool) -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    our_masks, our_classes = _outputs(ours, images, masked)
    hf_masks, hf_classes = _hf_outputs(hf_model, images, masked)
    assert our_masks.abs().max() > 0.5  # not a degenerate comparison
    assert (our_masks - hf_masks).abs().max() < 1e-4
    assert (our_classes - hf_classes).abs().max() < 1e-4


def _hf_dinov2(**overrides):
    config = transformers.EomtConfig(**{**HF_DIMS, **overrides})
    model = transformers.EomtForUniversalSegmentation(config)
    _randomize(model)
    return model


def _hf_dinov3():
    config = transformers.EomtDinov3Config(
        **HF_DIMS,
        intermediate_size=256,
        layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
    )
    model = transformers.EomtDinov3ForUniversalSegmentation(config)
    _randomize(model)
    return model


@pytest.mark.parametrize("masked", [False, True])
def test_transformers_dinov2_checkpoint_matches_transformers(make_tiny_eomt, tmp_path, masked):
    hf_model = _hf_dinov2()
    hf_model.save_pretrained(tmp_path)
    ours = make_tiny_eomt("dinov2")
    load_checkpoint(ours, tmp_path)
    _assert_parity(ours, hf_model, masked)


def test_transformers_swiglu_checkpoint_matches_transformers(tmp_path):
    hf_model = _hf_dinov2(use_swiglu_ffn=True)  # ViT-g style MLP; hidden (int(256 * 2/3) + 7) // 8 * 8 = 176
    hf_model.save_pretrained(tmp_path)
    ours = EoMT(
        "vit_giant_patch14_reg4_dinov2",
        img_size=64,
        num_classes=5,
        num_queries=7,
        num_blocks=2,
        backbone_kwargs=dict(embed_dim=64, depth=4, num_heads=2, mlp_ratio=352 / 64),
    )
    load_checkpoint(ours, tmp_path)
    _assert_parity(ours, hf_model, masked=True)


def test_transformers_directory_variants_load_the_same_weights(make_tiny_eomt, tmp_path):
    hf_model = _hf_dinov2()
    hf_model.save_pretrained(tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")

    reference = make_tiny_eomt()
    load_checkpoint(reference, tmp_path / "single")
    for variant in ("sharded", "bin"):
        model = make_tiny_eomt()
        load_checkpoint(model, tmp_path / variant)
        _assert_same_weights(reference, model)


@pytest.mark.parametrize("masked", [False, True])
def test_transformers_dinov3_checkpoint_matches_transformers(make_tiny_eomt, tmp_path, masked):
    hf_model = _hf_dinov3()
    hf_model.save_pretrained(tmp_path)
    ours = make_tiny_eomt("dinov3")
    load_checkpoint(ours, tmp_path / "model.safetensors")  # a single file works as well as the directory
    _assert_parity(ours, hf_model, masked)


@pytest.mark.parametrize(
    "family, hf_class",
    [
        ("dinov2", "EomtForUniversalSegmentation"),
        ("dinov3", "EomtDinov3ForUniversalSegmentation"),
    ],
)
def test_export_loads_in_transformers_and_back(make_tiny_eomt, tmp_path, family, hf_class):
    ours = make_tiny_eomt(family)
    _randomize(ours, seed=3)
    export_hf(ours, tmp_path)
    hf_model = getattr(transformers, hf_class).from_pretrained(tmp_path)
    _assert_parity(ours, hf_model, masked=True)

    reloaded = make_tiny_eomt(family)
    load_checkpoint(reloaded, tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_export_refuses_non_square_inputs(make_tiny_eomt, tmp_path):
    with pytest.raises(ValueError, match="square"):
        export_hf(make_tiny_eomt(img_size=(64, 96)), tmp_path)


def _assert_same_weights(a: EoMT, b: EoMT) -> None:
    b_state = b.state_dict()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b_state[key], value, rtol=0, atol=1e-6, msg=key)


def test_authors_release_loads(make_tiny_eomt, tmp_path):
    trained = make_tiny_eomt()
    trained.attn_mask_probs.fill_(0.25)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": authors_release_state(trained)}, path)
    fresh = make_tiny_eomt()
    load_checkpoint(fresh, path)
    _assert_same_weights(trained, fresh)


def _write_backbone(model: EoMT, path) -> None:
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, path)


def test_authors_dinov3_delta_adds_the_pretrained_backbone(make_tiny_eomt, tmp_path):
    pretrained = make_tiny_eomt("dinov3")
    _randomize(pretrained.backbone, seed=5)
    backbone_file = tmp_path / "dinov3_backbone.safetensors"
    _write_backbone(pretrained, backbone_file)

    finetuned = make_tiny_eomt("dinov3")
    _randomize(finetuned, seed=6)
    base = pretrained.state_dict()
    delta_state = {
        k: v - base[k] if k.startswith("backbone.") else v for k, v in finetuned.state_dict().items()
    }
    released = AUTHORS_DINOV3_DELTA.from_ours(delta_state)
    # The authors' DINOv3 releases use the Transformers DINOv3 names under network.encoder.backbone.
    assert "network.encoder.backbone.blocks.0.attention.q_proj.weight" in released
    assert "network.encoder.backbone.patch_embed.patch_embeddings.weight" in released
    released["network.encoder.pixel_mean"] = torch.zeros(1, 3, 1, 1)
    path = tmp_path / "pytorch_model.bin"
    torch.save(released, path)

    assert read_checkpoint(path).needs_pretrained_backbone
    with pytest.raises(CheckpointError, match="model.pretrained=true"):
        load_checkpoint(make_tiny_eomt("dinov3"), path)
    restored = make_tiny_eomt("dinov3", pretrained=True, pretrained_file=str(backbone_file))
    load_checkpoint(restored, path)
    _assert_same_weights(finetuned, restored)


def test_our_checkpoint_and_skipping_the_class_head(make_tiny_eomt, tmp_path):
    trained = make_tiny_eomt()
    path = tmp_path / "last.pt"
    torch.save({"model": trained.state_dict(), "step": 3, "epoch": 0}, path)
    same = make_tiny_eomt()
    load_checkpoint(same, path)
    _assert_same_weights(trained, same)

    other_classes = make_tiny_eomt(num_classes=9)
    head_before = other_classes.class_head.weight.clone()
    load_checkpoint(other_classes, path, skip_class_head=True)
    assert torch.equal(other_classes.class_head.weight, head_before)
    assert torch.equal(other_classes.q.weight, trained.q.weight)
    assert torch.equal(
        other_classes.backbone.blocks[0].attn.qkv.weight, trained.backbone.blocks[0].attn.qkv.weight
    )


def test_mismatched_checkpoint_counts_the_problems_in_one_line(make_tiny_eomt, tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": make_tiny_eomt(num_queries=9).state_dict()}, path)
    deeper = make_tiny_eomt(backbone_kwargs={"embed_dim": 64, "depth": 5, "num_heads": 2})
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(deeper, path)
    message = str(error.value)
    assert "\n" not in message
    assert (
        "15 keys differ (1 shapes, 14 missing, 0 unexpected), first q.weight: checkpoint (9, 64) vs"
        in message
    )
    assert "run directory" in message and "model.num_queries" in message

    hf_dir = tmp_path / "hf"
    _hf_dinov2().save_pretrained(hf_dir)
    with pytest.raises(CheckpointError, match=r"29 keys differ \(0 shapes, 16 missing, 13 unexpected\)"):
        load_checkpoint(make_tiny_eomt("dinov3"), hf_dir)


class _NotATensor:
    pass


def test_unrecognised_file_is_refused(make_tiny_eomt, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint"):
        load_checkpoint(make_tiny_eomt(), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights.pt is unreadable or not a PyTorch checkpoint"):
        load_checkpoint(make_tiny_eomt(), path)
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _NotATensor()}, path)
    with pytest.raises(
        CheckpointError, match=r"contains Python objects that weights-only loading refuses \(.*_NotATensor\)"
    ):
        load_checkpoint(make_tiny_eomt(), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(make_tiny_eomt(), tmp_path / "missing.bin")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_loads_its_weights(make_tiny_eomt, tmp_path, suffix):
    source = make_tiny_eomt("dinov3")
    _randomize(source.backbone, seed=7)
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        _write_backbone(source, path)
    else:
        torch.save(source.backbone.state_dict(), path)
    model = make_tiny_eomt("dinov3", pretrained=True, pretrained_file=str(path))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


def test_pretrained_file_is_resampled_from_patch_14(tmp_path):
    """DINOv2 weights come with 14x14 patches at 518 px; timm resamples them to the network's grid."""
    import timm

    dims = dict(embed_dim=64, depth=2, num_heads=2)
    original = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, num_classes=0, **dims)
    path = tmp_path / "dinov2.safetensors"
    save_file(original.state_dict(), path)
    model = EoMT(
        "vit_small_patch14_reg4_dinov2",
        img_size=64,
        num_classes=2,
        num_queries=3,
        num_blocks=1,
        pretrained=True,
        pretrained_file=str(path),
        backbone_kwargs=dims,
    )
    assert model.backbone.patch_embed.proj.weight.shape[-2:] == (16, 16)
    assert model.backbone.pos_embed.shape[1] == 16
    assert torch.equal(model.backbone.blocks[1].mlp.fc2.weight, original.blocks[1].mlp.fc2.weight)
