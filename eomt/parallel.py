"""What the training loop calls forward on: activation checkpointing, regional compile, then DDP or FSDP2.

`trainer.strategy=ddp` (the default) keeps a full replica of the weights, gradients and optimiser state on
every rank; `fsdp` shards them (`torch.distributed.fsdp.fully_shard`, FSDP2): each transformer block, then
the root. The order of `wrap_for_training` is torchtitan's: activation checkpointing of the blocks, the
regional compile (in place), then the data-parallel wrapper. Under fsdp the parameters become DTensors, so
the optimiser is built after `wrap_for_training`; the helpers below (gradient sync during accumulation,
gradient clipping, the full network for evaluation) hide the difference from the loop.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from eomt.compilation import compile_for_training
from eomt.errors import CheckpointError, ConfigError

STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."  # in named_parameters() of a checkpointed block only
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# --- the settings -----------------------------------------------------------------------------------
def checkpoint_every(setting: str | int | None) -> int:
    """`trainer.activation_checkpointing` as n (every n-th block is checkpointed; 0 = none)."""
    if setting in (None, "none"):
        return 0
    if setting == "blocks":
        return 1
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 0:
        return setting
    raise ConfigError(
        f"trainer.activation_checkpointing={setting} is not one of none|blocks|<n> (every n-th block, n >= 1)"
    )


def check_strategy(trainer: DictConfig) -> None:
    """The data-parallel settings, checked before anything is built."""
    strategy = trainer.get("strategy", "ddp")
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy} is not one of {'|'.join(STRATEGIES)}")
    if strategy == "fsdp" and trainer.precision == "fp16":
        raise ConfigError(
            "trainer.precision=fp16 needs a GradScaler, which trainer.strategy=fsdp does not use; "
            "use trainer.precision=bf16 (or fp32)"
        )
    checkpoint_every(trainer.get("activation_checkpointing", "none"))


# --- activation checkpointing -----------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module, every: int) -> None:
    """Recompute every `every`-th transformer block of `model.backbone.blocks` in the backward pass instead
    of keeping its activations (the n-th, 2n-th, ... block; `every=1`: all of them; 0: none), in place.

    Non-reentrant (`torch.utils.checkpoint`, use_reentrant=False) with the random state preserved, so a
    recomputed block draws the dropout / drop-path numbers of its forward; EoMT's annealing draw is made
    outside the blocks and is not repeated. State dicts keep their keys (the wrapper removes its prefix);
    `named_parameters()` shows the block's parameters under `CHECKPOINT_PREFIX`.
    """
    if every <= 0:
        return
    blocks = model.backbone.blocks
    for index, block in enumerate(blocks):
        if (index + 1) % every == 0 and not hasattr(block, "_checkpoint_wrapped_module"):
            blocks[index] = checkpoint_wrapper(block, preserve_rng_state=True)


# --- wrapping -----------------------------------------------------------------------------------------
def wrap_for_training(
    model: nn.Module, trainer: DictConfig, device: torch.device, world_size: int, precision: str
) -> nn.Module:
    """What the loop calls forward on, from the bare `model` (changed in place): its blocks checkpointed
    (`trainer.activation_checkpointing`), compiled by region (`trainer.compile`), then in DDP (several
    ranks; the bare model is the one saved: no `_orig_mod.` keys) or, with `trainer.strategy=fsdp`,
    sharded in place and returned itself (`Run.model` is then the sharded module)."""
    apply_activation_checkpointing(model, checkpoint_every(trainer.activation_checkpointing))
    if trainer.compile:
        compile_for_training(model, **trainer.compile_options)
    if trainer.strategy == "fsdp":
        shard(model, device, world_size, precision)
        return model
    if world_size > 1:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: parameters gathered and computed in bf16, gradients reduced in fp32; fp32: no casts.

    The inputs are not cast: the loop's autocast decides each op's dtype as under ddp, so the images are
    normalised in fp32 and the residual stream between the blocks stays fp32 (FSDP's own input cast
    would make both bf16)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy()


def shard(model: nn.Module, device: torch.device, world_size: int, precision: str) -> None:
    """FSDP2 in place: every transformer block of `model.backbone.blocks` is one unit (gathered for its
    forward and backward, resharded after), the rest of the network (embeddings, heads; EoMT's query
    embedding; the Mask2Former baselines' adapter and decoder) is the root's unit. BatchNorm layers (the
    baselines' adapter) are units of their own in fp32, as autocast leaves them: their running statistics
    are fp32 buffers, which batch_norm does not mix with bf16 weights."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision(precision)
    for module in model.modules():
        if isinstance(module, BATCH_NORMS) and policy.param_dtype is not None:
            fully_shard(module, mesh=mesh, mp_policy=mixed_precision("fp32"))
    for block in model.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # used at once by backward


# --- in the step ----------------------------------------------------------------------------------------
@contextmanager
def gradient_sync(forward_model: nn.Module, sync: bool) -> Iterator[None]:
    """A micro-batch's forward and backward; `sync=False` (all but the last of a step) accumulates the
    gradients locally: DDP's `no_sync`; FSDP skips the reduce-scatter and keeps the blocks' gathered
    parameters for the next micro-batch (no resharding and gathering again in between)."""
    if isinstance(forward_model, FSDPModule):
        forward_model.set_requires_gradient_sync(sync)
        forward_model.set_reshard_after_backward(sync)
        yield
    elif isinstance(forward_model, DistributedDataParallel) and not sync:
        with forward_model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients to a total 2-norm of at most `max_norm`; returns the norm before (a plain
    tensor). Sharded gradients (DTensors) count every shard once: their norm is reduced over the ranks."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=None)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total


# --- around the loop --------------------------------------------------------------------------------
class UnshardedCopy:
    """The full network under fsdp, for what needs one on a single rank (evaluation: ranks see different
    numbers of val images, and the forward cost is timed on rank 0 only).

    Made from the bare model before sharding: a copy whose parameters live on the meta device (no
    memory). Calling it with the sharded model gathers the full weights on every rank (a collective:
    every rank calls it) into a fresh copy of that template, on the training device."""

    def __init__(self, model: nn.Module):
        memo = {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()
        }
        self.template = copy.deepcopy(model, memo)

    def __call__(self, sharded: nn.Module) -> nn.Module:
        state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        full = copy.deepcopy(self.template)
        full.load_state_dict(state, assign=True)
        return full.train(sharded.training)


class FullModelState:
    """The sharded model's state as one full state dict (rank 0 holds it, on the CPU), so that the
    single-file checkpoints of `eomt.checkpointing` hold what a DDP run's do; loads a full state dict
    into the shards on every rank. (Interim: sharded DCP checkpoints replace it.)"""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class FullOptimizerState(FullModelState):
    """The optimiser state of the sharded model as one full state dict, keyed by parameter name."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__(model)
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if any(isinstance(key, int) for key in state.get("state", {})):  # torch's own, keyed by position
            raise CheckpointError(
                "the checkpoint's optimiser state was written by trainer.strategy=ddp; resume it with "
                "trainer.strategy=ddp, or start a new run from its weights with trainer.init_from=<checkpoint>"
            )
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=options)
