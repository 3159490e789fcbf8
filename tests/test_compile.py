"""torch.compile on the training path (regional) and for inference (whole), and bf16 autocast on the CPU.

Dynamo's behaviour (graphs, guards, recompilations, breaks) does not depend on the backend, so the
counting tests compile with `aot_eager` (no code generation); the end-to-end training test compiles with
Inductor, the default.
"""

import logging

import pytest
import torch
from conftest import logged
from test_train import FAST

import train
from eomt.compilation import CompileStats, compile_for_inference, compile_for_training
from eomt.config import compose
from eomt.device import training_precision
from eomt.errors import ConfigError
from eomt.model import EoMT
from eomt.model.blocks import ViTBlock
from eomt.profiling import bf16_peak_flops, training_mfu

AOT_EAGER = "+trainer.compile_options.backend=aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EOMT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def deep_eomt(depth: int = 24) -> EoMT:
    return EoMT(
        "vit_small_patch14_reg4_dinov2",
        img_size=64,
        num_classes=3,
        num_queries=6,
        num_blocks=4,
        backbone_kwargs=dict(embed_dim=32, depth=depth, num_heads=2),
    )


def test_blocks_keep_timm_names_and_compile_as_one_graph_set(make_tiny_eomt):
    model = deep_eomt()
    assert all(isinstance(block, ViTBlock) for block in model.backbone.blocks)
    assert "backbone.blocks.23.attn.qkv.weight" in model.state_dict()
    stats = CompileStats()
    compile_for_training(model, backend="aot_eager")
    images = torch.rand(2, 3, 64, 64)
    # Every annealing phase, several steps each: p = 1, 0 < p < 1 changing every step, p = 0.
    phases = {
        "masked": [[1.0] * 4] * 3,
        "annealing": [[p] * 4 for p in (0.9, 0.6, 0.3)],
        "open": [[0.0] * 4] * 3,
    }
    for name, probs in phases.items():
        for i, p in enumerate(probs):
            model.set_attn_mask_probs(p)
            mask_logits, class_logits = model(images)
            sum(m.mean() for m in mask_logits + class_logits).backward()
            if i == 0:
                after_first = stats.summary().frames
        assert stats.summary().frames == after_first, f"{name}: steps after the first compiled again"
    model.eval()
    model.masked_attn = False
    with torch.no_grad():  # evaluation, then back to training
        model(images)
        model(images[:1])
    model.train()
    model.masked_attn = True
    model(images)[0][-1].mean().backward()
    summary = stats.summary()
    assert summary.graph_breaks == 0 and summary.at_limit == []
    block_compilations = [n for n in summary.per_function if "blocks.py" in n]
    assert len(block_compilations) == 1  # one code object for all 24 blocks
    assert summary.per_function[block_compilations[0]] <= 4  # N / N+Q tokens, train / eval, batch size
    assert summary.frames <= 12 and summary.graphs <= 12


def test_training_run_compiles_a_bounded_number_of_graphs_whatever_the_depth(tmp_path, caplog):
    """train.py through p = 1, annealing and p = 0, then the final evaluation: same graphs at depth 4 and 24."""
    anneal = ["schedule.anneal_starts=[1,2]", "schedule.anneal_ends=[3,4]"]  # p = 1, 0 < p < 1, p = 0
    common = [*FAST, "trainer.compile=true", AOT_EAGER, "trainer.max_steps=6", *anneal]
    common += ["eval.every_epochs=1", "+dataset.max_val_images=2", "+dataset.max_train_images=24"]
    summaries = {}
    for depth in (4, 24):
        torch._dynamo.reset()
        stats = CompileStats()
        overrides = [*common, f"model.backbone_kwargs.depth={depth}", "model.backbone_kwargs.embed_dim=32"]
        with caplog.at_level(logging.INFO, logger="eomt"):
            train.train(train.build_run(compose(overrides), tmp_path / str(depth)))
        summaries[depth] = stats.summary()
        assert summaries[depth].graph_breaks == 0 and summaries[depth].at_limit == []
    assert summaries[24].frames == summaries[4].frames
    assert summaries[24].graphs == summaries[4].graphs
    assert "step 1 took" in caplog.text and "torch.compile:" in caplog.text
    assert "recompilations" in caplog.text.split("over the run")[0].splitlines()[-1]


def test_compiled_bf16_training_equals_eager_saves_bare_keys_and_resumes(tmp_path):
    """The default path (compile, bf16) with Inductor on the CPU: loss as eager, no `_orig_mod.`, resume."""
    bf16 = ["trainer.precision=bf16", "model.num_blocks=2"]
    eager = train.build_run(compose([*FAST, *bf16, "trainer.max_steps=4"]), tmp_path / "eager")
    train.train(eager)
    compiled = [*FAST, *bf16, "trainer.compile=true"]
    first = train.build_run(compose([*compiled, "trainer.max_steps=2"]), tmp_path / "compiled")
    assert first.precision == "bf16"
    train.train(first)
    state = torch.load(first.checkpoints.latest(), weights_only=True)
    assert not [k for k in state["model"] if "_orig_mod" in k]
    assert state["model"].keys() == eager.model.state_dict().keys()
    train.train(train.build_run(compose([*compiled, "trainer.max_steps=4"]), tmp_path / "compiled"))
    losses, reference = logged(tmp_path / "compiled"), logged(tmp_path / "eager")
    assert list(losses) == [1, 2, 3, 4]
    assert [losses[s] for s in range(1, 5)] == pytest.approx([reference[s] for s in range(1, 5)], rel=2e-2)


def test_inference_compiles_whole_without_breaks(make_tiny_eomt):
    model = make_tiny_eomt(masked_attn=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        stats = CompileStats()
        network = compile_for_inference(model, backend="aot_eager")  # fullgraph: a break would raise
        got = network(images)
        network(images[:1])
        network(images)
    summary = stats.summary()
    assert summary.per_function.total() == 2  # one graph, and one recompile for a dynamic batch size
    assert summary.graph_breaks == 0
    torch.testing.assert_close(got[0][-1], expected[0][-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1][-1], expected[1][-1], rtol=1e-5, atol=1e-5)


def test_compile_stats_names_a_function_at_the_recompile_limit():
    stats = CompileStats()

    @torch.compile(backend="eager", dynamic=False)
    def scaled(x, factor):
        return x * factor

    with torch._dynamo.config.patch(recompile_limit=2):
        for factor in range(4):  # an int argument is a guard: each new value recompiles, until the limit
            scaled(torch.ones(2), factor)
        summary = stats.summary()
    assert summary.recompiles >= 1
    assert any(name.startswith("scaled (") for name in summary.at_limit)


def test_bf16_on_the_cpu_keeps_loss_and_matching_in_fp32(make_tiny_eomt):
    """The criterion's fp32 islands: bf16 logits give exactly the loss of their fp32 copies (the same
    matching), and a bf16-autocast forward's loss is within 3% of the fp32 forward's."""
    cfg = compose(["experiment=demo", "loss.num_points=256"])
    from hydra.utils import instantiate

    criterion = instantiate(cfg.loss)
    model = make_tiny_eomt(num_classes=cfg.dataset.num_classes).train()
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 3, 64, 64, dtype=torch.bool)
    masks[:, 0, :32], masks[:, 1, 32:, :32], masks[:, 2, 40:, 40:] = True, True, True
    targets = [{"masks": m, "labels": torch.tensor([0, 1, 2])} for m in masks]

    def loss(mask_logits, class_logits):
        torch.manual_seed(0)  # the same sampled points
        return criterion(mask_logits, class_logits, targets)[0]

    with torch.no_grad():
        fp32 = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images)
    assert bf16[0][-1].dtype == torch.bfloat16
    as_fp32 = ([m.float() for m in bf16[0]], [c.float() for c in bf16[1]])
    assert loss(*bf16).item() == loss(*as_fp32).item()
    assert loss(*bf16).item() == pytest.approx(loss(*fp32).item(), rel=3e-2)


def test_training_precision_on_the_cpu():
    cpu = torch.device("cpu")
    assert training_precision("bf16", cpu) == "bf16"
    assert training_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="trainer.precision=fp16 trains on CUDA only"):
        training_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="trainer.precision=fp8 is not one of"):
        training_precision("fp8", cpu)


def test_mfu_against_the_gpu_peak():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("NVIDIA H200") == 989e12
    assert bf16_peak_flops("Some Other GPU") is None
    # 100 GFLOP forward, 1000 images/s: 3 x 1e11 x 1e3 = 3e14 FLOP/s of a 1e15 peak
    assert training_mfu(100.0, 1000.0, 1e15) == pytest.approx(0.3)
