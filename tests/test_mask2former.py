"""The ViT + Mask2Former baselines of the component-removal path (steps 0-3) and their parts."""

import fnmatch
import math

import pytest
import torch
from omegaconf import OmegaConf

from eomt.config import CONF_DIR, compose
from eomt.model import build_model
from eomt.model.mask2former import (
    DirectFeatures,
    Mask2FormerViT,
    MaskedTransformerDecoder,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    SimpleFeaturePyramid,
    ViTAdapter,
    ms_deform_attn,
)
from eomt.model.mask2former.deformable_attention import flatten_levels, reference_points
from eomt.training import param_groups

CONF = CONF_DIR
SIZE = 64
NUM_CLASSES = 5
NUM_QUERIES = 8

# (adapter, pixel_decoder, multi_scale) of the paper's Table 1, steps 0-3.
STEPS = {
    "step0_vit_adapter": (True, True, True),
    "step1_no_adapter": (False, True, True),
    "step2_no_pixel_decoder": (False, False, True),
    "step3_single_scale": (False, False, False),
}


def compose_config(overrides: list[str]):
    """The project's config on the synthetic data (64 px, 5 classes) with 8 queries."""
    return compose(["dataset=synthetic", f"task.num_queries={NUM_QUERIES}", *overrides])


@pytest.fixture(scope="module")
def tiny_model():
    """conf/model/m2f_tiny.yaml at 64 px, built with the given switches."""
    kwargs = OmegaConf.to_container(compose_config(["model=m2f_tiny"]).model, resolve=True)
    assert kwargs.pop("_target_") == "eomt.model.mask2former.Mask2FormerViT"
    del kwargs["name"], kwargs["adapter"], kwargs["pixel_decoder"], kwargs["multi_scale"]

    def build(adapter: bool, pixel_decoder: bool, multi_scale: bool) -> Mask2FormerViT:
        torch.manual_seed(0)
        return Mask2FormerViT(**kwargs, adapter=adapter, pixel_decoder=pixel_decoder, multi_scale=multi_scale)

    return build


# ---------------------------------------------------------------- deformable attention


def bilinear_loops(value, spatial_shapes, locations, weights):
    """Direct computation: for every (image, query, head, level, point), read the four pixels
    around the location (zero outside the map) and add them with bilinear and attention weights."""
    batch, _, heads, head_dim = value.shape
    num_queries, num_points = locations.shape[1], locations.shape[4]
    out = value.new_zeros(batch, num_queries, heads, head_dim)
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        level_value = value[:, start : start + h * w].reshape(batch, h, w, heads, head_dim)
        start += h * w
        for b in range(batch):
            for q in range(num_queries):
                for m in range(heads):
                    for p in range(num_points):
                        # pixel centres sit at (i + 0.5) / size
                        x = locations[b, q, m, level, p, 0] * w - 0.5
                        y = locations[b, q, m, level, p, 1] * h - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        fx, fy = x - x0, y - y0
                        corners = [
                            (y0, x0, (1 - fy) * (1 - fx)),
                            (y0, x0 + 1, (1 - fy) * fx),
                            (y0 + 1, x0, fy * (1 - fx)),
                            (y0 + 1, x0 + 1, fy * fx),
                        ]
                        for yy, xx, bilinear in corners:
                            if 0 <= yy < h and 0 <= xx < w:
                                out[b, q, m] += (
                                    weights[b, q, m, level, p] * bilinear * level_value[b, yy, xx, m]
                                )
    return out.flatten(2)


def test_ms_deform_attn_matches_direct_bilinear_sampling():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    batch, queries, heads, head_dim, points = 2, 5, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, dtype=torch.float64)
    # some locations fall outside the maps, where zeros are read
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.randn(batch, queries, heads, len(shapes) * points, dtype=torch.float64).softmax(-1)
    weights = weights.view(batch, queries, heads, len(shapes), points)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    expected_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]

    out = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2])
    expected = bilinear_loops(expected_inputs[0], shapes, expected_inputs[1], expected_inputs[2])
    assert out.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(inputs, expected_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def identity_deform_attn(dim: int) -> MSDeformAttn:
    attn = MSDeformAttn(dim, num_levels=1, num_heads=1, num_points=1)
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(dim))
            proj.bias.zero_()
        attn.sampling_offsets.bias.zero_()
    return attn


def test_deform_attn_offsets_are_in_pixels_of_each_level():
    """Zero offset at a pixel centre reads exactly that pixel; offset (+1, 0) reads its right
    neighbour, (0, +1) the one below, and zero past the edge."""
    torch.manual_seed(0)
    feature_map = torch.randn(1, 4, 3, 5)
    tokens, shapes = flatten_levels([feature_map])
    points = reference_points(shapes)
    attn = identity_deform_attn(4)
    torch.testing.assert_close(attn(tokens, points, tokens, shapes), tokens)

    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))
    right = torch.cat([feature_map[..., 1:], torch.zeros(1, 4, 3, 1)], dim=-1)
    torch.testing.assert_close(attn(tokens, points, tokens, shapes), flatten_levels([right])[0])

    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([0.0, 1.0]))
    below = torch.cat([feature_map[:, :, 1:], torch.zeros(1, 4, 1, 5)], dim=-2)
    torch.testing.assert_close(attn(tokens, points, tokens, shapes), flatten_levels([below])[0])


# ---------------------------------------------------------------- parts


def test_simple_feature_pyramid_levels():
    pyramid = SimpleFeaturePyramid(embed_dim=16, out_channels=8)
    maps = pyramid(torch.randn(2, 16, 4, 4))  # a 64 px image at patch 16
    assert pyramid.strides == [4, 8, 16, 32]
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    single = SimpleFeaturePyramid(embed_dim=16, out_channels=8, scales=(1.0,))
    assert single.strides == [16]
    assert [tuple(m.shape) for m in single(torch.randn(2, 16, 4, 4))] == [(2, 8, 4, 4)]


def test_pixel_decoders_give_quarter_mask_features_and_coarse_to_fine_memory():
    maps = [torch.randn(2, 16, SIZE // s, SIZE // s) for s in (4, 8, 16, 32)]
    for decoder in (
        MSDeformAttnPixelDecoder([16] * 4, [4, 8, 16, 32], hidden_dim=32, mask_dim=24, num_layers=2),
        DirectFeatures([16] * 4, [4, 8, 16, 32], hidden_dim=32),
    ):
        mask_features, memory = decoder(maps)
        assert mask_features.shape[-2:] == (16, 16)
        assert [tuple(m.shape) for m in memory] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]
        assert decoder.num_memory_levels == 3
    single = DirectFeatures([32], [16], hidden_dim=32)
    mask_features, memory = single([torch.randn(2, 32, 4, 4)])
    assert mask_features.shape == (2, 32, 16, 16)  # upscaled 1/16 -> 1/4
    assert len(memory) == 1 and memory[0].shape == (2, 32, 4, 4)


def test_vit_adapter_spreads_interactions_over_the_depth():
    adapter = ViTAdapter(embed_dim=64, depth=24, num_interactions=4)
    assert [(g.start, g.stop) for g in adapter.block_groups] == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert [len(block.extractors) for block in adapter.interactions] == [1, 1, 1, 3]


def test_decoder_attention_mask_follows_the_predicted_masks():
    decoder = MaskedTransformerDecoder(num_classes=3, num_queries=2, hidden_dim=8, mask_dim=8, num_layers=1)
    mask_features = torch.zeros(1, 8, 4, 4)
    mask_features[0, 0, :, :2] = 1.0  # channel 0 is on in the left half
    mask_features[0, 0, :, 2:] = -1.0
    with torch.no_grad():
        last = decoder.mask_head[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0  # every query's mask embedding = channel 0: mask = left half
    queries = torch.randn(1, 2, 8)
    mask_logits, class_logits, allowed = decoder.predict(queries, mask_features, (4, 4))
    assert class_logits.shape == (1, 2, 4)
    left_half = torch.zeros(4, 4, dtype=torch.bool)
    left_half[:, :2] = True
    assert allowed.shape == (1, 1, 2, 16)
    assert torch.equal(allowed[0, 0], left_half.flatten().expand(2, -1))

    with torch.no_grad():
        last.bias[0] = -1.0  # now every mask is empty: no query may be left attending nowhere
    _, _, allowed = decoder.predict(queries, -mask_features.abs(), (4, 4))
    assert allowed.all()


# ---------------------------------------------------------------- the network, steps 0-3


@pytest.mark.parametrize("step", list(STEPS))
def test_each_step_trains_on_cpu(tiny_model, step):
    model = tiny_model(*STEPS[step]).train()
    groups = param_groups(model, lr=1.0, weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {g["name"] for g in groups} >= {"backbone.blocks.0", "heads"}
    images = torch.rand(2, 3, SIZE, SIZE)
    mask_logits, class_logits = model(images)

    num_layers = len(model.transformer_decoder.layers)
    assert len(mask_logits) == len(class_logits) == num_layers + 1
    for masks, classes in zip(mask_logits, class_logits, strict=True):
        assert masks.shape == (2, NUM_QUERIES, SIZE // 4, SIZE // 4)
        assert classes.shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
        assert torch.isfinite(masks).all() and torch.isfinite(classes).all()

    loss = sum(m.sigmoid().mean() for m in mask_logits) + sum(c.logsumexp(-1).mean() for c in class_logits)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the backbone is trained too, not only the heads
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        final_masks, final_classes = model(images)
    assert len(final_masks) == len(final_classes) == 1
    assert final_masks[0].shape == (2, NUM_QUERIES, SIZE // 4, SIZE // 4)


def test_switches_select_the_components(tiny_model):
    step0 = tiny_model(*STEPS["step0_vit_adapter"])
    assert isinstance(step0.adapter, ViTAdapter) and step0.pyramid is None
    assert isinstance(step0.pixel_decoder, MSDeformAttnPixelDecoder)
    step2 = tiny_model(*STEPS["step2_no_pixel_decoder"])
    assert step2.adapter is None and step2.pyramid.strides == [4, 8, 16, 32]
    assert isinstance(step2.pixel_decoder, DirectFeatures)
    step3 = tiny_model(*STEPS["step3_single_scale"])
    assert step3.pyramid.strides == [16] and step3.transformer_decoder.num_levels == 1
    # each step removes parameters
    sizes = [sum(p.numel() for p in tiny_model(*s).parameters()) for s in STEPS.values()]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("switches", [(True, True, False), (False, True, False), (True, False, False)])
def test_single_scale_needs_the_other_components_removed(tiny_model, switches):
    with pytest.raises(ValueError, match="multi_scale"):
        tiny_model(*switches)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("step", list(STEPS))
def test_component_step_configs_select_the_table_rows(step):
    cfg = compose_config([f"+component_step={step}"])
    assert cfg.model._target_ == "eomt.model.mask2former.Mask2FormerViT"
    assert cfg.model.backbone == "vit_large_patch14_reg4_dinov2"
    assert (cfg.model.adapter, cfg.model.pixel_decoder, cfg.model.multi_scale) == STEPS[step]
    # `model=m2f_tiny` on the command line keeps the step's switches on the tiny network
    tiny = compose_config([f"+component_step={step}", "model=m2f_tiny"])
    model = build_model(tiny.model)
    assert (model.adapter is not None, type(model.pixel_decoder) is MSDeformAttnPixelDecoder) == STEPS[step][
        :2
    ]


@pytest.mark.parametrize(("step", "annealing"), [("step4_eomt_masked", False), ("step5_eomt", True)])
def test_eomt_steps_differ_only_in_annealing(step, annealing):
    cfg = compose_config([f"+component_step={step}"])
    assert cfg.model._target_ == "eomt.model.EoMT"
    assert cfg.model.masked_attn is True
    assert cfg.schedule.annealing is annealing


def test_components_sweep_runs_all_six_steps():
    sweep = OmegaConf.load(CONF / "sweep" / "components.yaml")
    pattern = sweep.hydra.sweeper.params["+component_step"]
    assert pattern.startswith("glob(") and pattern.endswith(")")
    options = sorted(p.stem for p in (CONF / "component_step").glob("*.yaml"))
    swept = fnmatch.filter(options, pattern[len("glob(") : -1])
    assert swept == [*STEPS, "step4_eomt_masked", "step5_eomt"]


def test_each_step_runs_in_its_own_directory():
    names = {
        compose_config([f"+component_step={step}"]).name
        for step in [*STEPS, "step4_eomt_masked", "step5_eomt"]
    }
    assert len(names) == 6


@pytest.mark.slow
@pytest.mark.parametrize("step", sorted(p.stem for p in (CONF / "component_step").glob("step*.yaml")))
def test_each_table_row_trains_and_evaluates_on_synthetic_data(step, tmp_path, monkeypatch):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train

    monkeypatch.setenv("EOMT_CACHE", str(tmp_path / "cache"))
    tiny = "m2f_tiny" if int(step[4]) <= 3 else "tiny"
    overrides = ["experiment=demo", f"+component_step={step}", f"model={tiny}", "trainer.num_workers=0"]
    overrides += [
        "trainer.max_steps=2",
        "trainer.log_every_steps=1",
        "loss.num_points=256",
        "eval.every_epochs=1",
    ]
    cfg = compose_config(overrides)
    train.train(train.build_run(cfg, tmp_path / "run"))
    events = EventAccumulator(str(tmp_path / "run")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == [1, 2] and all(math.isfinite(e.value) for e in events)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["step"] == 2 and "PQ" in record["metrics"] and record["gflops"] > 0
