"""eomt.parallel: activation checkpointing, and DDP / FSDP2 wrapping of the training model."""

import copy

import pytest
import torch

from eomt.errors import ConfigError
from eomt.parallel import CHECKPOINT_PREFIX, apply_activation_checkpointing, checkpoint_every


@pytest.mark.parametrize(("setting", "every"), [("none", 0), (None, 0), ("blocks", 1), (1, 1), (3, 3)])
def test_checkpoint_every_reads_the_setting(setting, every):
    assert checkpoint_every(setting) == every


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
    "trainer.max_steps=3",
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
    from pathlib import Path

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["EOMT_CACHE"] = cache
    torch.set_num_threads(1)
    import train
    from eomt.config import compose

    out = {}
    for strategy, extra in (("ddp", []), ("fsdp", FSDP)):
        run = train.build_run(compose([*TWO_RANKS, *extra]), Path(root, strategy))
        groups = _groups(run)  # before the first step: the lrs are the groups' own
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
        }
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
def test_fsdp_trains_as_ddp_does_with_half_the_memory_per_rank(tmp_path, tmp_path_factory):
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
    # the same losses, clipped gradients and weights after 3 steps of 2 accumulated micro-batches
    losses = {s: logged(tmp_path / s) for s in ("ddp", "fsdp")}
    assert sorted(losses["ddp"]) == [1, 2, 3]
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

    # each rank holds about half of the parameters and of the AdamW moments
    for rank in ranks:
        assert 0.45 < rank["fsdp"]["param_bytes"] / rank["ddp"]["param_bytes"] < 0.55
        assert 0.45 < rank["fsdp"]["optim_bytes"] / rank["ddp"]["optim_bytes"] < 0.55
    # the final evaluation ran on both (unequal shards of the val split) with the forward cost on rank 0
    records = {s: json.loads((tmp_path / s / "metrics.json").read_text()) for s in ("ddp", "fsdp")}
    assert records["fsdp"]["fps"] > 0 and records["fsdp"]["params"] == records["ddp"]["params"]
    assert records["fsdp"]["metrics"] == pytest.approx(records["ddp"]["metrics"], abs=1e-6)
