"""Plan a training run's GPU memory before renting the GPUs: peak bytes per GPU for a preset, a
strategy (ddp | fsdp), activation checkpointing and a number of GPUs, and which presets fit on 40, 80
and 141 GB cards.

    python -m eomt.plan experiment=coco_panoptic_vit_g_1280 [trainer.strategy=fsdp]
        [trainer.activation_checkpointing=blocks] [gpus=8] [targets=50]
    python -m eomt.plan presets=all [gpus=8]        # (or --all) every published preset: the README's table

How: one training step (the loop's forward under autocast, the loss, the backward) runs on fake
tensors (`FakeTensorMode`: shapes and dtypes, no data, nothing allocated) at the preset's per-GPU
micro-batch and crop, while `LiveBytes` (a dispatch mode) adds up the bytes of every tensor alive
after each operation. The loss's host decisions (the Hungarian assignment, the index bookkeeping)
need values: the planner's matcher assigns target n to query n, and operations whose inputs are all
real tensors run for real (small index tensors). Weights, gradients and AdamW state then follow from
the strategy: ddp keeps everything on every GPU (plus DDP's gradient buckets); fsdp divides the fp32
weights, gradients and AdamW state by the GPUs and adds the all-gathered bf16 copy of the largest
block (and the next one, prefetched) and the root's unsharded bf16 weights, with activations traced
on the bf16 weights its MixedPrecisionPolicy computes with.

The trace uses the CPU's kernels and autocast lists; bench/gpu_check.sh compares the estimate with
`torch.cuda.max_memory_allocated` on a GPU. The allocator's fragmentation and the CUDA context
(about 0.5-1 GB) are not in the estimate: the table keeps a margin for them (`HEADROOM`).
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch._C._profiler import _EventType
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from eomt.config import CONF_DIR, check_config, compose, split_key_values
from eomt.device import AMP_DTYPES
from eomt.errors import ConfigError, user_errors
from eomt.model import build_model
from eomt.parallel import apply_activation_checkpointing, check_strategy, checkpoint_every
from eomt.training.batch_layout import batch_layout
from eomt.training.matcher import HungarianMatcher

GB = 1e9  # GPU memory as vendors state it: 40, 80, 141 GB
GPU_SIZES_GB = (40, 80, 141)
HEADROOM = 0.9  # the share of a card the planner lets a step use (CUDA context, fragmentation)
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32 per parameter


# --- counting live tensor bytes -------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of every tensor storage alive, by kind (`param`, `grad`, `act`: everything else), and their
    peak (`peak`, and `at_peak`: the kinds then), updated after every operation.

    A storage counts from the operation that makes it (or `track`) until Python frees it. Under a
    FakeTensorMode, operations whose tensor inputs are all real (and, inside `host_values()`, factory
    calls) run for real: the few small index tensors whose values a step's host code reads.
    """

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.bytes = {"param": 0, "grad": 0, "act": 0}
        self.weights = {"param": 1.0, "grad": 1.0, "act": 1.0, **(weights or {})}
        self.peak = 0.0
        self.at_peak = dict(self.bytes)  # `bytes` when the weighted total peaked
        self._kinds: dict[int, list] = {}  # id(storage) -> [kind, nbytes]
        self._real_factories = False

    @property
    def total(self) -> float:
        """The bytes alive, each kind times its weight (1 unless given: fsdp's planner counts the traced
        gradients as the shards they become and the traced weights not at all)."""
        return sum(self.weights[kind] * nbytes for kind, nbytes in self.bytes.items())

    def track(self, tensor: Tensor, kind: str = "act") -> None:
        """Count `tensor`'s storage as `kind` (re-labels a storage counted already)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._kinds.get(key)
        if entry is not None:
            if entry[0] != kind:
                self.bytes[entry[0]] -= entry[1]
                self.bytes[kind] += entry[1]
                entry[0] = kind
            return
        entry = [kind, storage.nbytes()]
        self._kinds[key] = entry
        self.bytes[kind] += entry[1]
        weakref.finalize(storage, self._free, key)
        self._update_peaks()

    def _free(self, key: int) -> None:
        kind, nbytes = self._kinds.pop(key)
        self.bytes[kind] -= nbytes

    def _update_peaks(self) -> None:
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.bytes)

    @contextmanager
    def host_values(self):
        """Factory calls (torch.zeros, torch.tensor, ...) make real tensors inside this block."""
        self._real_factories, previous = True, self._real_factories
        try:
            yield
        finally:
            self._real_factories = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        real = all(not isinstance(t, FakeTensor) for t in tensors) and (tensors or self._real_factories)
        with unset_fake_temporarily() if real else nullcontext():
            out = func(*args, **kwargs)
        tree_map_only(Tensor, self.track, out)
        return out


def watch_grads(model: nn.Module, meter: LiveBytes) -> list:
    """Count every parameter's storage as `param` and its gradient, once accumulated, as `grad`."""
    handles = []
    for p in model.parameters():
        meter.track(p, "param")
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(lambda p: meter.track(p.grad, "grad")))
    return handles


class PlannedMatcher(HungarianMatcher):
    """The matcher's cost matrices (for their memory), then target n -> query n: the assignment's
    values do not change a step's memory, only the number of matched masks does."""

    def __call__(self, mask_logits, class_logits, target_masks, target_labels, num_targets):
        self.costs(mask_logits, class_logits, target_masks, target_labels)
        num_blocks, batch_size, num_queries = mask_logits.shape[:3]
        slots = torch.arange(target_masks.shape[-2])
        matched = torch.where(slots[None] < num_targets.clamp(max=num_queries)[:, None], slots, -1)
        return matched.expand(num_blocks, -1, -1).contiguous()


# --- one traced training step ---------------------------------------------------------------------
def build_fake_model(
    model_cfg: DictConfig, mode: FakeTensorMode, dtype: torch.dtype | None = None
) -> nn.Module:
    """The network with fake weights (in `dtype`, if given, as FSDP's MixedPrecisionPolicy gathers them):
    built on the meta device (no initialisation runs), then given fake CPU storage."""
    model_cfg = model_cfg.copy()
    model_cfg.pretrained = False  # no weights are read; the shapes are the pretrained ones
    model_cfg.pretrained_file = None
    with torch.device("meta"):
        model = build_model(model_cfg)
    for param in model.parameters() if dtype is not None else ():
        param.data = param.data.to(dtype)  # the weights only: FSDP casts no buffers
    with mode:
        model.to_empty(device="cpu")
    return model.train()


def synthetic_batch(
    batch: int, crop: Sequence[int], num_targets: int, num_classes: int, device: str | torch.device = "cpu"
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Random uint8 images and `num_targets` random masks per image at the crop size, with their labels
    (under a FakeTensorMode: fake, except the labels, which the loss reads on the host)."""
    images = torch.randint(0, 256, (batch, 3, *crop), dtype=torch.uint8, device=device)
    targets = [
        {
            "masks": torch.rand(num_targets, *crop, device=device) > 0.5,
            "labels": (torch.arange(num_targets) % num_classes).to(device),
        }
        for _ in range(batch)
    ]
    return images, targets


def forward_backward(
    model: nn.Module,
    criterion: nn.Module,
    images: Tensor,
    targets: list[dict[str, Tensor]],
    amp_dtype: torch.dtype | None,
    intermediate_losses: bool = True,
    micro_batches: int = 1,
    loss_context: Callable = nullcontext,
) -> None:
    """One micro-batch as train.py's optimisation_step makes it: uint8 images -> float, the forward under
    autocast, the loss, the backward of its share of the step."""
    x = images.float().div_(255)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        mask_logits, class_logits = model(x)
    if not intermediate_losses:
        mask_logits, class_logits = mask_logits[-1:], class_logits[-1:]
    with loss_context():
        loss, _ = criterion(mask_logits, class_logits, targets)
    (loss / micro_batches).backward()


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    targets: list[dict[str, Tensor]],
    amp_dtype: torch.dtype | None,
    grad_clip: float,
) -> None:
    """A real step on one device (what the planner's estimate is checked against: tests/test_plan.py on
    the CPU, bench/plan_check.py on a GPU): forward and backward, clipping, AdamW, gradients freed."""
    forward_backward(model, criterion, images, targets, amp_dtype)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measured_cpu_peak(step: Callable[[], None], alive: Sequence[Tensor] = ()) -> int:
    """Peak bytes of a real `step()` on the CPU, to check the planner against: the storages of `alive`
    (what exists before it: weights, optimiser state) plus the highest running sum of every allocation
    and free that torch.profiler(profile_memory=True) records during it."""
    before = sum(t.untyped_storage().nbytes() for t in alive)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(event) -> None:
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        for child in event.children:
            walk(child)

    for event in prof.profiler.kineto_results.experimental_event_tree():
        walk(event)
    running = highest = 0
    for _, nbytes in sorted(events):
        running += nbytes
        highest = max(highest, running)
    return before + highest


def trace_step(
    model: nn.Module,
    criterion: nn.Module,
    images: Tensor,
    targets: list[dict[str, Tensor]],
    amp_dtype: torch.dtype | None,
    micro_batches: int,
    intermediate_losses: bool,
    meter: LiveBytes,
) -> dict[str, int]:
    """`forward_backward` over `micro_batches` micro-batches (gradients accumulate) on fake tensors,
    counted by `meter` -> the param, grad and act bytes alive when their sum peaked."""
    handles = watch_grads(model, meter)
    for t in [images] + [t["masks"] for t in targets]:  # the batch on the device
        meter.track(t)
    try:
        with meter:
            for _ in range(micro_batches):
                forward_backward(
                    model,
                    criterion,
                    images,
                    targets,
                    amp_dtype,
                    intermediate_losses,
                    micro_batches,
                    meter.host_values,
                )
    finally:
        for handle in handles:
            handle.remove()
    return meter.at_peak


# --- from a trace to bytes per GPU ----------------------------------------------------------------
@dataclass
class Plan:
    """Peak bytes per GPU of one training step, by part."""

    name: str
    strategy: str
    checkpointing: str
    gpus: int
    micro_batch: int
    accumulation: int
    num_params: int
    weights: int  # fp32 weights (fsdp: this GPU's shard)
    gradients: int  # fp32 gradients alive at the peak (fsdp: their shards)
    optimizer: int  # AdamW's two moments (fsdp: the shard)
    activations: int  # activations and temporaries at the peak, the batch included
    unsharded: int  # ddp: gradient buckets; fsdp: gathered bf16 weights (root, a block and the next) and a block's gradients

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.unsharded

    def fits(self, gb: float) -> bool:
        return self.total <= HEADROOM * gb * GB


def plan_memory(cfg: DictConfig, gpus: int = 4, targets: int = 50, name: str | None = None) -> Plan:
    """The peak memory per GPU of one training step of `cfg` (trainer.strategy, .activation_checkpointing,
    .precision, .batch_size) on `gpus` GPUs, with `targets` masks per image."""
    check_config(cfg)
    check_strategy(cfg.trainer)
    if gpus < 1:
        raise ConfigError(f"gpus={gpus} must be at least 1")
    strategy = cfg.trainer.strategy
    every = checkpoint_every(cfg.trainer.activation_checkpointing)
    micro, accum = batch_layout(cfg.trainer.batch_size, cfg.trainer.micro_batch_size, gpus)
    amp_dtype = AMP_DTYPES[cfg.trainer.precision]

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # fsdp's MixedPrecisionPolicy computes on gathered copies in the autocast dtype
    model = build_fake_model(cfg.model, mode, amp_dtype if strategy == "fsdp" else None)
    num_params = sum(p.numel() for p in model.parameters())
    blocks = model.backbone.blocks
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    root_params = num_params - sum(p.numel() for b in blocks for p in b.parameters())
    apply_activation_checkpointing(model, every)  # as wrap_for_training does

    def fake_draw(shape, device):
        with mode:
            return torch.rand(shape, device=device)

    criterion = instantiate(cfg.loss, draw_points=fake_draw)
    criterion.matcher = PlannedMatcher(criterion.class_weight, criterion.mask_weight, criterion.dice_weight)
    if hasattr(model, "set_attn_mask_probs"):  # mid-annealing: masked attention on and the draws made
        model.set_attn_mask_probs([0.5] * model.num_blocks)
    crop = list(cfg.dataset.crop_size)
    with mode:
        images, batch = synthetic_batch(micro, crop, targets, cfg.dataset.num_classes)
    for target in batch:
        target["labels"] = torch.arange(targets) % cfg.dataset.num_classes  # real: the host reads them
    compute_bytes = 2 if amp_dtype is not None else 4
    shard = math.ceil(num_params / gpus)
    # fsdp: the gathered weights are arithmetic (below), and a block's traced gradient becomes its shard
    sharded = {"param": 0.0, "grad": 4 * shard / (compute_bytes * num_params)} if strategy == "fsdp" else None
    traced = trace_step(
        model,
        criterion,
        images,
        batch,
        amp_dtype,
        min(accum, 2),
        cfg.trainer.intermediate_losses,
        LiveBytes(sharded),
    )

    fp32 = 4 * num_params
    if strategy == "ddp":
        buckets = fp32 if gpus > 1 else 0  # DDP's reducer copies the gradients into its buckets
        at_step = {"param": fp32, "grad": fp32, "act": 0}  # the optimiser step: all gradients, no activations
        parts = max(traced, at_step, key=lambda d: sum(d.values()))
        weights, gradients, activations, unsharded = parts["param"], parts["grad"], parts["act"], buckets
        optimizer = ADAMW_STATE_BYTES * num_params
    else:
        if accum == 1:
            # The root's weights stay gathered; a block is gathered while the next one is prefetched, and
            # a block's gradients exist unsharded (compute dtype, then fp32 for the reduce-scatter).
            gathered = compute_bytes * (root_params + 2 * block_params) + (compute_bytes + 4) * block_params
        else:
            # Between micro-batches nothing is resharded (eomt.parallel.gradient_sync): every weight stays
            # gathered and the unsharded gradients accumulate in fp32 until the step's last micro-batch.
            gathered = (compute_bytes + 4) * num_params
        # At the trace's peak only the gradients of the blocks done by then exist, as their shards; at the
        # optimiser step every shard and no activations.
        grads = round(traced["grad"] * sharded["grad"])
        at_peak = {"grad": grads, "act": traced["act"], "gathered": gathered}
        at_step = {"grad": 4 * shard, "act": 0, "gathered": 0}
        parts = max(at_peak, at_step, key=lambda d: sum(d.values()))
        weights, optimizer = 4 * shard, ADAMW_STATE_BYTES * shard
        gradients, activations, unsharded = parts["grad"], parts["act"], parts["gathered"]
    return Plan(
        name=name or cfg.get("name", "-"),
        strategy=strategy,
        checkpointing="none" if not every else ("blocks" if every == 1 else f"every {every}"),
        gpus=gpus,
        micro_batch=micro,
        accumulation=accum,
        num_params=num_params,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        unsharded=unsharded,
    )


# --- the command ----------------------------------------------------------------------------------
OPTIONS = (("ddp", "none"), ("ddp", "blocks"), ("fsdp", "none"), ("fsdp", "blocks"))  # fastest first
USAGE = (
    "usage: python -m eomt.plan experiment=<preset> [trainer.strategy=ddp|fsdp] "
    "[trainer.activation_checkpointing=none|blocks] [gpus=4] [targets=50] | presets=all (or --all) [gpus=4]"
)


def published_presets() -> list[str]:
    """Every preset in conf/experiment/ but the CPU demo."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem != "demo")


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:.1f}"


def describe(plan: Plan) -> str:
    """One plan, part by part, and the cards it fits."""
    rows = [
        ("weights", plan.weights),
        ("gradients", plan.gradients),
        ("AdamW state", plan.optimizer),
        ("activations", plan.activations),
        ("DDP buckets" if plan.strategy == "ddp" else "gathered (fsdp)", plan.unsharded),
        ("total", plan.total),
    ]
    fits = ", ".join(f"{gb} GB: {'yes' if plan.fits(gb) else 'no'}" for gb in GPU_SIZES_GB)
    lines = [
        f"{plan.name}: {plan.num_params / 1e6:.0f} M parameters, {plan.strategy}, activation checkpointing "
        f"{plan.checkpointing}, {plan.gpus} GPU(s), micro-batch {plan.micro_batch} x {plan.accumulation} "
        "accumulation step(s)",
        *(f"  {name:<16} {_gb(nbytes):>7} GB" for name, nbytes in rows),
        f"  fits ({HEADROOM:.0%} of a card): {fits}",
    ]
    return "\n".join(lines)


def option_name(strategy: str, checkpointing: str) -> str:
    return strategy + ("+ckpt" if checkpointing != "none" else "")


def table(plans: dict[str, dict[tuple[str, str], Plan]]) -> str:
    """Markdown: GB per GPU for every option, and the fastest option that fits each card."""
    head = ["preset", "params", "micro-batch"] + [option_name(*o) for o in OPTIONS]
    head += [f"{gb} GB" for gb in GPU_SIZES_GB]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, by_option in plans.items():
        first = next(iter(by_option.values()))
        row = [preset, f"{first.num_params / 1e9:.2f} B", str(first.micro_batch)]
        row += [_gb(by_option[o].total) for o in OPTIONS]
        for gb in GPU_SIZES_GB:
            fitting = [o for o in OPTIONS if by_option[o].fits(gb)]
            row.append(option_name(*fitting[0]) if fitting else "no")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    argv = ["presets=all" if arg == "--all" else arg for arg in argv]
    own, overrides = split_key_values(argv, {"gpus", "targets", "presets"}, USAGE)
    for key in ("gpus", "targets"):
        if key in own and not own[key].isdigit():
            raise ConfigError(f"{key}={own[key]} must be a positive integer")
    gpus, targets = int(own.get("gpus", 4)), int(own.get("targets", 50))
    if own.get("presets") is None:
        print(describe(plan_memory(compose(overrides), gpus, targets)))
        return
    if own["presets"] != "all":
        raise ConfigError(f"presets={own['presets']}: only presets=all (every published preset) exists")
    plans: dict[str, dict[tuple[str, str], Plan]] = {}
    for preset in published_presets():
        plans[preset] = {}
        for strategy, checkpointing in OPTIONS:
            option = [f"trainer.strategy={strategy}", f"trainer.activation_checkpointing={checkpointing}"]
            cfg = compose([f"experiment={preset}", *overrides, *option])
            plans[preset][(strategy, checkpointing)] = plan_memory(cfg, gpus, targets, preset)
        print(f"planned {preset}", file=sys.stderr, flush=True)
    print(f"Peak GB per GPU on {gpus} GPU(s), {targets} masks per image; the fastest option that fits:\n")
    print(table(plans))


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
