import pytest
import timm
import torch
from torch import nn

from eomt.errors import ConfigError
from eomt.training import param_groups

DIM = 32
DEPTH = 4


class StandIn(nn.Module):
    """The attributes of eomt.model.EoMT that param_groups relies on, around a tiny timm backbone."""

    def __init__(self, backbone: nn.Module, num_blocks: int = 2):
        super().__init__()
        self.backbone = backbone
        self.num_blocks = num_blocks
        self.q = nn.Embedding(5, DIM)
        self.class_head = nn.Linear(DIM, 4)
        self.mask_head = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.upscale = nn.Sequential(nn.ConvTranspose2d(DIM, DIM, 2, stride=2), nn.GroupNorm(1, DIM))
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))


def dinov2_vit(**kwargs) -> nn.Module:
    return timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        img_size=32,
        patch_size=16,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
        num_classes=0,
        **kwargs,
    )


def dinov3_eva() -> nn.Module:
    return timm.create_model(
        "vit_small_patch16_dinov3",
        pretrained=False,
        img_size=32,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=2,
        num_classes=0,
    )


def group_of(groups: list[dict], model: nn.Module) -> dict[str, dict]:
    """Parameter name -> the group holding it."""
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


@pytest.fixture(scope="module")
def model() -> StandIn:
    return StandIn(dinov2_vit())


def test_every_trainable_parameter_lands_in_exactly_one_group(model):
    groups = param_groups(model, lr=1.0, weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))


def test_layer_wise_lr(model):
    groups = group_of(param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5), model)
    expected = {
        "backbone.cls_token": 0.125,  # block 0's rate
        "backbone.reg_token": 0.125,
        "backbone.pos_embed": 0.125,
        "backbone.patch_embed.proj.weight": 0.125,
        "backbone.blocks.0.attn.qkv.weight": 0.125,
        "backbone.blocks.1.mlp.fc1.bias": 0.25,
        "backbone.blocks.2.norm1.weight": 0.5,
        "backbone.blocks.3.ls2.gamma": 1.0,
        "backbone.norm.weight": 1.0,
        "q.weight": 1.0,
        "class_head.weight": 1.0,
        "mask_head.2.bias": 1.0,
        "upscale.0.weight": 1.0,
    }
    assert {name: groups[name]["lr"] for name in expected} == pytest.approx(expected)
    assert all(g["base_lr"] == g["lr"] for g in groups.values())
    assert {name for name, g in groups.items() if not g["is_backbone"]} == {
        name for name, _ in model.named_parameters() if not name.startswith("backbone.")
    }
    assert groups["backbone.blocks.0.attn.qkv.weight"]["name"] == "backbone.blocks.0"
    assert groups["class_head.weight"]["name"] == "heads"


def test_query_blocks_keep_the_full_lr_without_their_decay(model):
    groups = group_of(
        param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5, decay_query_blocks=False), model
    )
    lrs = [groups[f"backbone.blocks.{j}.attn.proj.weight"]["lr"] for j in range(DEPTH)]
    assert lrs == pytest.approx([0.125, 0.25, 1.0, 1.0])  # model.num_blocks == 2
    assert groups["backbone.cls_token"]["lr"] == pytest.approx(0.125)


def test_weight_decay_is_applied_to_every_parameter_by_default(model):
    # The release: AdamW(param_groups, weight_decay=0.05) over groups that set no weight decay.
    groups = param_groups(model, lr=1.0, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05] * len(groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_weight_decay_exempt_names_what_gets_none(model):
    groups = group_of(
        param_groups(
            model, lr=1.0, weight_decay=0.05, weight_decay_exempt=["one_dim", "position", "tokens", "queries"]
        ),
        model,
    )
    no_decay = {name for name, g in groups.items() if g["weight_decay"] == 0.0}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token", "q.weight"} <= no_decay
    assert {
        "backbone.blocks.0.ls1.gamma",
        "backbone.norm.bias",
        "class_head.bias",
        "upscale.1.weight",
    } <= no_decay
    decayed = {name for name, g in groups.items() if g["weight_decay"] == 0.05}
    assert decayed == {name for name, p in model.named_parameters() if p.ndim > 1} - no_decay
    assert {
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.3.mlp.fc2.weight",
        "upscale.0.weight",
    } <= decayed
    only_queries = group_of(
        param_groups(model, lr=1.0, weight_decay=0.05, weight_decay_exempt=["queries"]), model
    )
    assert {name for name, g in only_queries.items() if g["weight_decay"] == 0.0} == {"q.weight"}
    with pytest.raises(ConfigError, match="weight_decay_exempt: unknown \\['norms'\\]"):
        param_groups(model, lr=1.0, weight_decay=0.05, weight_decay_exempt=["norms"])


def test_dinov3_eva_backbone():
    model = StandIn(dinov3_eva(), num_blocks=1)
    groups = group_of(param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5), model)
    assert len(groups) == len(list(model.parameters()))
    assert groups["backbone.reg_token"]["lr"] == pytest.approx(0.125)
    assert groups["backbone.blocks.3.attn.qkv.weight"]["lr"] == 1.0
    assert groups["backbone.blocks.0.gamma_1"]["weight_decay"] == 0.05


def test_frozen_parameters_are_left_out():
    model = StandIn(dinov2_vit())
    model.backbone.patch_embed.requires_grad_(False)
    grouped = {id(p) for g in param_groups(model, lr=1.0, weight_decay=0.05) for p in g["params"]}
    assert id(model.backbone.patch_embed.proj.weight) not in grouped
    assert id(model.backbone.blocks[0].attn.qkv.weight) in grouped


def test_unknown_backbone_parameter_fails_loudly():
    model = StandIn(dinov2_vit())
    model.backbone.head = nn.Linear(DIM, 10)  # a classifier the segmentation model never uses
    with pytest.raises(ValueError, match="'head.weight' matches no layer-wise lr rule"):
        param_groups(model, lr=1.0, weight_decay=0.05)


def test_groups_drive_adamw():
    model = StandIn(dinov2_vit())
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.05))
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    optimizer.step()
    optimizer.zero_grad()
    assert not torch.equal(before, model.backbone.blocks[0].attn.qkv.weight)
