import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from eomt.model import EoMT, build_model
from eomt.model.attention import attention
from eomt.profiling import gflops_per_image

FAMILIES = ["dinov2", "dinov3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("masked_attn", [True, False])
def test_output_shapes(make_tiny_eomt, family, masked_attn):
    model = make_tiny_eomt(family, img_size=(64, 96), masked_attn=masked_attn).eval()
    with torch.no_grad():
        mask_logits, class_logits = model(torch.rand(2, 3, 64, 96))
    expected_len = model.num_blocks + 1 if masked_attn else 1
    assert len(mask_logits) == len(class_logits) == expected_len
    for masks, classes in zip(mask_logits, class_logits, strict=True):
        assert masks.shape == (2, 7, 16, 24)
        assert classes.shape == (2, 7, 6)
    assert model.attn_mask_probs.shape == (2,)
    assert "attn_mask_probs" in model.state_dict()


def test_without_upscale_blocks_masks_stay_at_the_patch_grid(make_tiny_eomt):
    model = make_tiny_eomt(img_size=(64, 96), num_upscale_blocks=0)
    assert len(model.upscale) == 0
    mask_logits, class_logits = model(torch.rand(1, 3, 64, 96))
    assert all(m.shape == (1, 7, 4, 6) for m in mask_logits)
    assert len(make_tiny_eomt(num_upscale_blocks=None).upscale) == 2  # patch 16 -> 1/4: two blocks


@pytest.mark.parametrize(
    "backbone, kwargs",
    [
        ("eva02_tiny_patch14_224", {"depth": 3}),  # Eva with 'cat' rope, SwiGLU + scale norm, abs pos embed
        ("deit3_small_patch16_224", {"embed_dim": 64, "depth": 3, "num_heads": 2}),  # ViT, no registers
    ],
)
def test_other_timm_vits_run(backbone, kwargs):
    model = EoMT(backbone, img_size=64, num_classes=3, num_queries=4, num_blocks=2, backbone_kwargs=kwargs)
    mask_logits, class_logits = model(torch.rand(1, 3, 64, 64))
    assert mask_logits[-1].shape == (1, 4, 16, 16) and class_logits[-1].shape == (1, 4, 4)
    assert len(mask_logits) == 3


def test_attention_mask_rows(make_tiny_eomt):
    model = make_tiny_eomt()
    num_q, num_prefix, grid = 7, model.num_prefix_tokens, (4, 4)
    logits = torch.full((1, num_q, 16, 16), -1.0)
    logits[0, 1, :8, :8] = 1.0  # query 1: top-left quarter of the image = top-left 2x2 patches
    mask = model.attention_mask(logits, grid, prob=torch.tensor(1.0))[0, 0]
    start = num_q + num_prefix
    assert mask.shape == (start + 16, start + 16)
    assert mask[:, :start].all()  # everyone sees queries and prefix tokens
    assert mask[num_q:].all()  # prefix and patch tokens see everything
    assert not mask[0, start:].any()  # query 0: empty mask -> no patch
    on_patches = mask[1, start:].view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(on_patches, expected)


def test_annealing_lifts_rows_with_probability_one_minus_p(make_tiny_eomt):
    model = make_tiny_eomt()
    torch.manual_seed(0)
    logits = torch.full((16, 7, 16, 16), -1.0)  # every query masked off every patch
    start = 7 + model.num_prefix_tokens

    def lifted_fraction(p: float) -> float:
        mask = model.attention_mask(logits, (4, 4), prob=torch.tensor(p))[:, 0, :7, start:]
        rows_lifted = mask.all(dim=-1)
        assert (rows_lifted | ~mask.any(dim=-1)).all()  # a row is lifted entirely or not at all
        return rows_lifted.float().mean().item()

    assert lifted_fraction(1.0) == 0.0
    assert lifted_fraction(0.0) == 1.0
    assert 0.35 < lifted_fraction(0.5) < 0.65


def test_annealing_draws_random_numbers_only_in_blocks_with_p_below_one(make_tiny_eomt):
    # The release draws one uniform number per (image, query) in a block only when its p < 1.
    model = make_tiny_eomt().eval()  # 2 query blocks, 7 queries; eval: no dropout draws
    images = torch.rand(2, 3, 64, 64)

    def rng_after_forward(probs: list[float]) -> torch.Tensor:
        model.attn_mask_probs.copy_(torch.tensor(probs))
        torch.manual_seed(0)
        with torch.no_grad():
            model(images)
        return torch.get_rng_state()

    def rng_after_draws(count: int) -> torch.Tensor:
        torch.manual_seed(0)
        for _ in range(count):
            torch.rand(2, 7)
        return torch.get_rng_state()

    assert torch.equal(rng_after_forward([1.0, 1.0]), rng_after_draws(0))
    assert torch.equal(rng_after_forward([1.0, 0.5]), rng_after_draws(1))
    assert torch.equal(rng_after_forward([0.0, 0.5]), rng_after_draws(2))


def test_probabilities_set_through_the_model_decide_the_draws_without_reading_the_device(make_tiny_eomt):
    model = make_tiny_eomt().eval()
    images = torch.rand(2, 3, 64, 64)

    def draws_after(set_probs) -> int:
        set_probs()
        torch.manual_seed(0)
        with torch.no_grad():
            model(images)
        after = torch.get_rng_state()
        for count in range(3):
            torch.manual_seed(0)
            for _ in range(count):
                torch.rand(2, 7)
            if torch.equal(torch.get_rng_state(), after):
                return count
        raise AssertionError("more draws than query blocks")

    reads = []
    real_bool = torch.Tensor.__bool__
    torch.Tensor.__bool__ = lambda t: reads.append(t) or real_bool(t)
    try:
        assert draws_after(lambda: model.set_attn_mask_probs([1.0, 0.5])) == 1
        assert reads == []  # the branch used the host copy
        assert (
            draws_after(lambda: model.attn_mask_probs.fill_(0.5)) == 2
        )  # written directly: host copy unused
        assert len(reads) == 2
    finally:
        torch.Tensor.__bool__ = real_bool


@pytest.mark.parametrize("family", FAMILIES)
def test_query_with_empty_mask_sees_queries_and_prefix_only(make_tiny_eomt, family):
    model = make_tiny_eomt(family).eval()
    num_q, start = 7, 7 + model.num_prefix_tokens
    images = torch.rand(1, 3, 64, 64)
    tokens, rope, grid = model._runner.embed(images)
    x = torch.cat((model.q.weight[None], tokens), dim=1)
    logits = torch.full((1, num_q, 16, 16), -1.0)
    logits[0, 1] = 1.0  # query 1 sees every patch, query 0 none
    mask = model.attention_mask(logits, grid, prob=torch.tensor(1.0))
    attn = model.backbone.blocks[-1].attn

    def run(inputs):
        with torch.no_grad():
            return attention(attn, inputs, rope=rope, num_unroped=start, attn_mask=mask)

    changed = x.clone()
    changed[:, start:] += torch.randn_like(changed[:, start:])
    before, after = run(x), run(changed)
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=1e-6)
    assert (after[:, 1] - before[:, 1]).abs().max() > 1e-3
    changed_prefix = x.clone()
    changed_prefix[:, num_q:start] += 1.0
    assert (run(changed_prefix)[:, 0] - before[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_probabilities_zero_equal_unmasked_path(make_tiny_eomt, family):
    model = make_tiny_eomt(family).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        model.attn_mask_probs.zero_()
        masked, masked_classes = model(images)
        model.attn_mask_probs.fill_(1.0)
        fully_masked, _ = model(images)
        model.masked_attn = False
        plain, plain_classes = model(images)
    torch.testing.assert_close(masked[-1], plain[-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_classes[-1], plain_classes[-1], rtol=0, atol=1e-5)
    assert (fully_masked[-1] - plain[-1]).abs().max() > 1e-4  # the mask does change the result


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_reaches_every_parameter(make_tiny_eomt, family):
    model = make_tiny_eomt(family).train()
    model.attn_mask_probs.fill_(0.5)
    mask_logits, class_logits = model(torch.rand(2, 3, 64, 64))
    loss = sum(m.float().square().mean() for m in mask_logits) + sum(c.square().mean() for c in class_logits)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_bad_settings_name_the_key(make_tiny_eomt):
    with pytest.raises(ValueError, match="model.num_blocks=5"):
        make_tiny_eomt(num_blocks=5)
    with pytest.raises(ValueError, match="model.img_size"):
        make_tiny_eomt(img_size=(64, 70))
    with pytest.raises(ValueError, match="model.pretrained=true"):
        make_tiny_eomt(pretrained_file="weights.safetensors")


def test_unsupported_block_is_named():
    with pytest.raises(TypeError, match="ParallelThingsBlock"):
        EoMT(
            "vit_small_patch16_18x2_224",
            img_size=32,
            num_classes=2,
            num_queries=2,
            num_blocks=1,
            backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
        )


def test_build_model_drops_name_and_instantiates():
    model = build_model(
        {
            "_target_": "eomt.model.EoMT",
            "name": "tiny",
            "backbone": "vit_small_patch14_reg4_dinov2",
            "img_size": [32, 48],
            "num_classes": 3,
            "num_queries": 4,
            "num_blocks": 1,
            "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
        }
    )
    assert isinstance(model, EoMT)
    assert model.img_size == (32, 48) and model.num_queries == 4 and model.num_classes == 3


def test_dinov3_rope_augmentation_acts_in_training_only(make_tiny_eomt):
    dims = {"embed_dim": 64, "depth": 4, "num_heads": 2, "rope_rescale_coords": 2.0}
    model = make_tiny_eomt("dinov3", masked_attn=False, backbone_kwargs=dims)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        first, second = model.train()(images)[0][-1], model(images)[0][-1]
        assert (first - second).abs().max() > 1e-4
        torch.testing.assert_close(model.eval()(images)[0][-1], model(images)[0][-1], rtol=0, atol=0)


def test_gradients_have_the_layout_of_their_parameters_so_ddp_does_not_warn(make_tiny_eomt, tmp_path):
    """DDP's "grad strides do not match bucket view strides": the depthwise conv's weight gradient."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = make_tiny_eomt()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask_logits, class_logits = ddp(torch.rand(2, 3, 64, 64))
            (mask_logits[-1].sum() + class_logits[-1].sum()).backward()
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "strides" in str(w.message)]
    assert all(p.grad.stride() == p.stride() for p in model.parameters() if p.grad is not None)


def test_cpu_flop_count_includes_attention(make_tiny_eomt):
    q = torch.rand(2, 3, 50, 8)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # the CPU's fused kernel
    assert counter.get_total_flops() == 2 * 2 * (2 * 3 * 50 * 50 * 8)  # q k^T and (softmax) v
    model = make_tiny_eomt(masked_attn=False).eval()
    images = torch.rand(1, 3, *model.img_size)
    with sdpa_kernel(SDPBackend.MATH):  # attention as plain matmuls, which the counter always knew
        plain = gflops_per_image(model, images)
    assert gflops_per_image(model, images) == pytest.approx(plain)
