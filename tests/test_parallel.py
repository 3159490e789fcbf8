"""eomt.parallel: activation checkpointing, and DDP / FSDP2 wrapping of the training model."""

import copy

import pytest
import torch

from eomt.errors import ConfigError
from eomt.parallel import CHECKPOINT_PREFIX, apply_activation_checkpointing, check_strategy, checkpoint_every


@pytest.mark.parametrize(
    ("setting", "every"), [("none", 0), (None, 0), (0, 0), ("blocks", 1), (1, 1), (3, 3)]
)
def test_checkpoint_every_reads_the_setting(setting, every):
    assert checkpoint_every(setting) == every


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.strategy=zero3"], "trainer.strategy=zero3 is not one of ddp|fsdp"),
        (["trainer.strategy=fsdp", "trainer.precision=fp16"], "use trainer.precision=bf16"),
        (["trainer.activation_checkpointing=some"], "trainer.activation_checkpointing=some is not one of"),
    ],
)
def test_strategy_mistakes_are_one_line(overrides, message):
    from eomt.config import compose

    with pytest.raises(ConfigError, match=message):
        check_strategy(compose(["experiment=demo", *overrides]).trainer)


@pytest.mark.parametrize("setting", ["all", 0.5, -1, True])
def test_checkpoint_every_rejects_other_settings_in_one_line(setting):
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing=.*none|blocks"):
        checkpoint_every(setting)


def _grads(model, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one forward/backward from `seed` (drop path and annealing draw from it)."""
    torch.manual_seed(seed)
    images = torch.rand(2, 3, 64, 64)
    mask_logits, class_logits = model(images)
    loss = sum(m.square().mean() for m in mask_logits) + sum(c.square().mean() for c in class_logits)
    loss.backward()
    grads = {name.replace(CHECKPOINT_PREFIX, ""): p.grad for name, p in model.named_parameters()}
    return loss.item(), grads


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_blocks_give_the_same_gradients_mid_annealing_with_drop_path(make_tiny_eomt, every):
    torch.manual_seed(0)
    plain = make_tiny_eomt(
        backbone_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2, "drop_path_rate": 0.3}
    )
    plain.set_attn_mask_probs([0.5, 0.7])  # mid-annealing: the forward draws which masks are lifted
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, every)

    wrapped = [
        i for i, b in enumerate(checkpointed.backbone.blocks) if hasattr(b, "_checkpoint_wrapped_module")
    ]
    assert wrapped == list(range(every - 1, 4, every))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys

    loss, grads = _grads(plain, seed=1)
    loss_ckpt, grads_ckpt = _grads(checkpointed, seed=1)
    assert loss_ckpt == loss
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=0, msg=name)
    # Drop path is on and matters: another seed gives another loss.
    assert _grads(copy.deepcopy(plain), seed=2)[0] != loss


# --- two ranks over gloo: fsdp trains as ddp does -------------------------------------------------------
TWO_RANKS = [
    "experiment=demo",
    "dataset.generator.num_train=24",
    "dataset.generator.num_val=5",  # 3 + 2 images: the ranks run different numbers of val batches
    "trainer.num_workers=0",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=2",  # x 2 ranks x 2 accumulation steps
    "trainer.max_steps=4",
    "trainer.log_every_steps=1",
    "trainer.ckpt_every_steps=1000",
    "schedule.grad_clip=0.01",
    "schedule.warmup_steps=0",  # the full lr from the first step: the weights move
    "schedule.backbone_warmup_steps=0",  # below the gradients' norm: every step clips
    "eval.every_epochs=1000",  # the last step only, with its forward-cost benchmark on rank 0
    "eval.batch_size=2",
    "eval.num_overlays=0",
    "loss.num_points=64",
]
NAN_STEP = 2  # the third step's loss is not finite on rank 1
FSDP = [
    "trainer.strategy=fsdp",
    "trainer.activation_checkpointing=2",
    "trainer.compile=true",
    "+trainer.compile_options.backend=aot_eager",  # Dynamo and AOTAutograd around FSDP's hooks, no codegen
]


def _local_bytes(tensors) -> int:
    """This rank's bytes of `tensors` (a DTensor counts its own shard only)."""
    from torch.distributed.tensor import DTensor

    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def _groups(run) -> list[tuple]:
    """The optimiser's groups by parameter name: (name, lr, weight decay, parameter names)."""
    names = {id(p): n.replace(CHECKPOINT_PREFIX, "") for n, p in run.model.named_parameters()}
    return [
        (g["name"], g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
        for g in run.optimizer.param_groups
    ]


def _two_rank_worker(rank: int, port: int, root: str, cache: str) -> None:
    import os
    import signal
    from pathlib import Path

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["EOMT_CACHE"] = cache
    torch.set_num_threads(1)
    import train
    from eomt.config import compose

    def build(strategy: str, overrides: list[str], stop_in_step: int | None = None):
        run = train.build_run(compose([*TWO_RANKS, *overrides]), Path(root, strategy))
        loss = run.criterion.forward

        def criterion(*args, **kwargs):
            total, terms = loss(*args, **kwargs)
            if rank == 1 and run.state.step == stop_in_step:
                signal.raise_signal(signal.SIGUSR2)  # rank 1 alone is told to stop: after this step
            if rank == 1 and run.state.step == NAN_STEP:
                total = total * float("nan")  # this step is skipped on both ranks
            return total, terms

        run.criterion.forward = criterion
        return run

    out = {}
    for strategy, extra in (("ddp", []), ("fsdp", FSDP)):
        run = build(strategy, extra, stop_in_step=1 if strategy == "fsdp" else None)
        groups = _groups(run)  # before the first step: the lrs are the groups' own
        if strategy == "fsdp":  # stopped after 2 steps, checkpointed, then resumed to the end
            with pytest.raises(SystemExit):
                train.train(run)
            run = build(strategy, extra)
        train.train(run)
        state = {k: v.clone() for k, v in run.evaluated().state_dict().items()}  # fsdp: gathered
        out[strategy] = {
            "groups": groups,
            "param_bytes": _local_bytes(run.model.parameters()),
            "optim_bytes": _local_bytes(
                t for s in run.optimizer.state.values() for t in s.values() if t.ndim
            ),
            "state": state,
            "sharded": [type(p).__name__ for p in run.model.parameters()][:1],
            "replicas": train.distributed.check_replicas(run.model),
            "skipped": run.state.skipped_steps,
        }
    with torch.no_grad():
        run.model.attn_mask_probs[0] += rank  # a replicated buffer drifts on rank 1
    out["drifted"] = train.distributed.check_replicas(run.model)
    torch.save(out, Path(root, f"rank{rank}.pt"))
    train.distributed.cleanup()


def _spawn(fn, args, nprocs: int, timeout: float) -> None:
    """mp.spawn with a deadline: a rank left waiting in a collective fails the test instead of hanging it."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {timeout:.0f} s (a collective deadlock?)")


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_through_a_skip_and_a_resume_with_half_the_memory_per_rank(
    tmp_path, tmp_path_factory
):
    import json
    import os
    import socket

    from conftest import logged

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = os.environ.get("EOMT_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    _spawn(_two_rank_worker, (port, str(tmp_path), cache), nprocs=2, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ddp, fsdp = ranks[0]["ddp"], ranks[0]["fsdp"]
    assert fsdp["sharded"] == ["DTensor"] and ddp["sharded"] == ["Parameter"]

    # the same layer-wise lr and weight-decay groups, by parameter name
    assert fsdp["groups"] == ddp["groups"]
    # the same losses, clipped gradients and weights after 4 steps of 2 accumulated micro-batches, the third
    # skipped (a non-finite loss), the fsdp run stopped by a signal after the second and resumed
    losses = {s: logged(tmp_path / s) for s in ("ddp", "fsdp")}
    assert sorted(losses["ddp"]) == sorted(losses["fsdp"]) == [1, 2, 4]
    assert ddp["skipped"] == fsdp["skipped"] == 1
    for step, loss in losses["ddp"].items():
        assert losses["fsdp"][step] == pytest.approx(loss, rel=1e-5), step
    norms = {s: logged(tmp_path / s, "train/grad_norm") for s in ("ddp", "fsdp")}
    assert all(n > 0.01 for n in norms["ddp"].values())  # clipping was on at every step
    assert norms["fsdp"] == pytest.approx(norms["ddp"], rel=1e-4)
    initial_change = 0
    for name, value in ddp["state"].items():
        torch.testing.assert_close(fsdp["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        initial_change += not torch.equal(value, ranks[1]["ddp"]["state"][name])
    assert initial_change == 0  # ddp's replicas agree, and fsdp's gathered copy is the same on both ranks
    for name, value in fsdp["state"].items():
        assert torch.equal(value, ranks[1]["fsdp"]["state"][name]), name

    # under fsdp the replica check compares what is replicated (buffers), not the shards
    assert [(r["fsdp"]["replicas"], r["drifted"]) for r in ranks] == [(True, False)] * 2

    # each rank holds about half of the parameters and of the AdamW moments
    for rank in ranks:
        assert 0.45 < rank["fsdp"]["param_bytes"] / rank["ddp"]["param_bytes"] < 0.55
        assert 0.45 < rank["fsdp"]["optim_bytes"] / rank["ddp"]["optim_bytes"] < 0.55
    # the final evaluation ran on both (unequal shards of the val split) with the forward cost on rank 0
    records = {s: json.loads((tmp_path / s / "metrics.json").read_text()) for s in ("ddp", "fsdp")}
    assert records["fsdp"]["fps"] > 0 and records["fsdp"]["params"] == records["ddp"]["params"]
    assert records["fsdp"]["metrics"] == pytest.approx(records["ddp"]["metrics"], abs=1e-6)


def test_one_process_shards_over_a_group_of_its_own_and_evaluates_a_full_copy(make_tiny_eomt):
    """fsdp on a single rank (a group in memory, no port); the gathered copy computes what the model does."""
    from eomt import distributed
    from eomt.parallel import UnshardedCopy, shard

    torch.manual_seed(0)
    model = make_tiny_eomt().eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
    env = distributed.init("cpu", group_of_one=True)
    try:
        assert (env.world_size, distributed.is_initialized(), distributed.world_size()) == (1, True, 1)
        unsharded = UnshardedCopy(model)
        assert all(p.is_meta for p in unsharded.template.parameters())  # the template holds no weights
        shard(model, torch.device("cpu"), 1, "fp32")
        assert {type(p).__name__ for p in model.parameters()} == {"DTensor"}
        full = unsharded(model)
        assert not any(type(p).__name__ == "DTensor" or p.is_meta for p in full.parameters())
        with torch.no_grad():
            for got, want in zip(full(images), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            for got, want in zip(model(images), expected, strict=True):  # the sharded forward, too
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        distributed.cleanup()


def test_the_mask2former_baseline_shards_too_in_bf16_with_its_batch_norms_in_fp32():
    from eomt import distributed
    from eomt.config import compose
    from eomt.model import build_model
    from eomt.parallel import BATCH_NORMS, shard

    torch.manual_seed(0)
    model = build_model(compose(["experiment=demo", "model=m2f_tiny"]).model).train()
    assert any(isinstance(m, BATCH_NORMS) for m in model.modules())  # the ViT-Adapter's
    distributed.init("cpu", group_of_one=True)
    try:
        shard(model, torch.device("cpu"), 1, "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mask_logits, class_logits = model(torch.rand(2, 3, 64, 64))
        (sum(m.float().mean() for m in mask_logits) + sum(c.float().mean() for c in class_logits)).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    finally:
        distributed.cleanup()
