import pytest
import torch
import transformers
from conftest import HF_DIMS
from hydra import initialize_config_dir

import eomt.config
from eomt import api
from eomt.export_hf import main as export_main
from eomt.model import EoMT, load_checkpoint

TINY = ["model=tiny", "model.img_size=[64,64]", "model.num_queries=7", "model.num_classes=5"]


@pytest.mark.parametrize(
    "name, backbone, num_blocks",
    [
        ("vit_s", "vit_small_patch14_reg4_dinov2", 3),
        ("vit_b", "vit_base_patch14_reg4_dinov2", 3),
        ("vit_l", "vit_large_patch14_reg4_dinov2", 4),
        ("vit_g", "vit_giant_patch14_reg4_dinov2", 5),
        ("dinov3_vit_s", "vit_small_patch16_dinov3_qkvb", 3),
        ("dinov3_vit_b", "vit_base_patch16_dinov3_qkvb", 3),
        ("dinov3_vit_l", "vit_large_patch16_dinov3_qkvb", 4),
    ],
)
def test_model_configs_compose(name, backbone, num_blocks):
    cfg = eomt.config.compose([f"model={name}"])
    model_cfg = cfg.model
    assert model_cfg.name == name and model_cfg.backbone == backbone and model_cfg.num_blocks == num_blocks
    assert model_cfg.pretrained is True and model_cfg.patch_size == 16
    assert list(model_cfg.img_size) == list(cfg.dataset.crop_size)
    assert model_cfg.num_queries == cfg.task.num_queries


def test_compose_defaults_to_vit_l_and_survives_an_initialised_hydra():
    with initialize_config_dir(config_dir=str(eomt.config.CONF_DIR), version_base="1.3"):
        cfg = eomt.config.compose(["model.num_queries=3"])
    assert cfg.model.name == "vit_l" and cfg.model.num_queries == 3
    with pytest.raises(FileNotFoundError, match="config_name"):
        eomt.config.compose([], config_name="nope")


def test_load_applies_the_overrides():
    model = api.load([*TINY, "model.img_size=[64,96]", "model.num_blocks=3", "model.masked_attn=false"])
    assert isinstance(model, EoMT) and not model.training
    assert (model.num_queries, model.num_classes, model.num_blocks, model.img_size) == (7, 5, 3, (64, 96))
    with torch.no_grad():
        mask_logits, class_logits = model(torch.rand(1, 3, 64, 96))
    assert (
        len(mask_logits) == 1
        and mask_logits[0].shape == (1, 7, 16, 24)
        and class_logits[0].shape == (1, 7, 6)
    )


def test_load_builds_the_real_vit_s():
    model = api.load(
        ["model=vit_s", "model.pretrained=false", "model.img_size=[32,32]", "model.num_blocks=2"]
    )
    assert len(model.backbone.blocks) == 12 and model.backbone.embed_dim == 384 and model.num_blocks == 2


def test_load_with_checkpoint_never_fetches_pretrained_weights(tmp_path):
    config = transformers.EomtConfig(**HF_DIMS)
    transformers.EomtForUniversalSegmentation(config).save_pretrained(tmp_path / "hf")
    # pretrained=true on a custom-size backbone would try the hub and fail offline.
    model = api.load([*TINY, "model.pretrained=true"], checkpoint=str(tmp_path / "hf"))
    reference = api.load(TINY)
    load_checkpoint(reference, tmp_path / "hf")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_export_cli_writes_a_transformers_model(tmp_path, capsys):
    trained = api.load(TINY)
    torch.save({"model": trained.state_dict(), "step": 1}, tmp_path / "last.pt")
    export_main(["--checkpoint", str(tmp_path / "last.pt"), "--out", str(tmp_path / "hf"), *TINY])
    assert "model.safetensors" in capsys.readouterr().out
    hf_model = transformers.EomtForUniversalSegmentation.from_pretrained(tmp_path / "hf")
    assert hf_model.config.num_queries == 7 and hf_model.config.num_labels == 5
    assert torch.equal(hf_model.query.weight, trained.q.weight)
