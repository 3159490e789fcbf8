"""The memory planner against a real step: `eomt.plan`'s estimate and the measured peak of one training step
(eager, the planner's synthetic batch), side by side.

    python bench/plan_check.py experiment=coco_panoptic_vit_l_640 trainer.batch_size=4 [--targets 50] [--json f]
    python bench/plan_check.py experiment=demo trainer.strategy=fsdp trainer.precision=bf16 trainer.batch_size=2 \
        model.backbone_kwargs.embed_dim=384 model.backbone_kwargs.depth=8 model.backbone_kwargs.num_heads=6 \
        --cpu-fsdp-ranks 2

On a GPU: torch.cuda.max_memory_allocated of the step (run by bench/gpu_check.sh). With --cpu-fsdp-ranks N:
N gloo processes train the model sharded by eomt.parallel.shard (FSDP2) and each rank's peak is what
torch.profiler records (`eomt.plan.measured_cpu_peak`), against the planner's fsdp estimate for N GPUs.
The network is randomly initialised (nothing is downloaded); the first step creates AdamW's moments and
the second is measured, as the planner counts a step in steady state.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate

from eomt import plan
from eomt.config import compose
from eomt.errors import user_errors
from eomt.model import build_model
from eomt.parallel import apply_activation_checkpointing, checkpoint_every, clip_grad_norm, shard

GIB = 2**30


def measure(overrides: list[str], targets: int) -> dict:
    cfg = compose(overrides)
    estimate = plan.plan_memory(cfg, gpus=1, targets=targets)
    device = torch.device("cuda")
    model_cfg = cfg.model.copy()
    model_cfg.pretrained, model_cfg.pretrained_file = False, None
    torch.manual_seed(0)
    model = build_model(model_cfg).train().to(device)
    apply_activation_checkpointing(model, checkpoint_every(cfg.trainer.activation_checkpointing))
    criterion = instantiate(cfg.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if hasattr(model, "set_attn_mask_probs"):
        model.set_attn_mask_probs([0.5] * model.num_blocks)  # as the planner: mid-annealing
    amp_dtype = plan.AMP_DTYPES[cfg.trainer.precision]

    def step() -> None:
        images, batch = plan.synthetic_batch(
            estimate.micro_batch, cfg.dataset.crop_size, targets, cfg.dataset.num_classes, device
        )
        plan.train_step(model, criterion, optimizer, images, batch, amp_dtype, cfg.schedule.grad_clip)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    return {
        "config": overrides,
        "device": torch.cuda.get_device_name(0),
        "micro_batch": estimate.micro_batch,
        "checkpointing": estimate.checkpointing,
        "targets": targets,
        "estimate_gib": estimate.total / GIB,
        "measured_gib": measured / GIB,
        "ratio": estimate.total / measured,
    }


def _fsdp_rank(rank: int, world: int, overrides: list[str], targets: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = compose(overrides)
    model_cfg = cfg.model.copy()
    model_cfg.pretrained, model_cfg.pretrained_file = False, None
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    apply_activation_checkpointing(model, checkpoint_every(cfg.trainer.activation_checkpointing))
    shard(model, torch.device("cpu"), world, cfg.trainer.precision)
    criterion = instantiate(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if hasattr(model, "set_attn_mask_probs"):
        model.set_attn_mask_probs([0.5] * model.num_blocks)
    micro = plan.layout(cfg, world)[0]
    amp_dtype = plan.AMP_DTYPES[cfg.trainer.precision]

    def step() -> None:
        images, batch = plan.synthetic_batch(micro, cfg.dataset.crop_size, targets, cfg.dataset.num_classes)
        plan.forward_backward(model, criterion, images, batch, amp_dtype)
        clip_grad_norm(model.parameters(), cfg.schedule.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    alive = [t.to_local() if hasattr(t, "to_local") else t for t in [*model.parameters(), *states]]
    results.put((rank, plan.measured_cpu_peak(step, alive)))
    dist.destroy_process_group()


def measure_cpu_fsdp(overrides: list[str], targets: int, ranks: int) -> dict:
    estimate = plan.plan_memory(compose(overrides), gpus=ranks, targets=targets)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = 29500 + os.getpid() % 1000
    workers = [
        context.Process(target=_fsdp_rank, args=(r, ranks, overrides, targets, port, results))
        for r in range(ranks)
    ]
    for worker in workers:
        worker.start()
    peaks = dict(results.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    measured = max(peaks.values())
    return {
        "config": overrides,
        "device": f"CPU, {ranks} gloo ranks, FSDP2",
        "micro_batch": estimate.micro_batch,
        "checkpointing": estimate.checkpointing,
        "targets": targets,
        "estimate_gib": estimate.total / GIB,
        "measured_gib": measured / GIB,
        "measured_per_rank_gib": [peaks[r] / GIB for r in sorted(peaks)],
        "ratio": estimate.total / measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. experiment=coco_panoptic_vit_l_640"
    )
    parser.add_argument("--targets", type=int, default=50, help="masks per image")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--cpu-fsdp-ranks", type=int, default=0, help="check fsdp on this many CPU processes")
    args = parser.parse_args()
    if args.cpu_fsdp_ranks:
        result = measure_cpu_fsdp(args.overrides, args.targets, args.cpu_fsdp_ranks)
    elif not torch.cuda.is_available():
        raise SystemExit("error: bench/plan_check.py needs a CUDA GPU (or --cpu-fsdp-ranks N)")
    else:
        result = measure(args.overrides, args.targets)
    print(
        f"{' '.join(args.overrides)} on {result['device']}: estimate {result['estimate_gib']:.2f} GiB, "
        f"measured {result['measured_gib']:.2f} GiB (estimate / measured {result['ratio']:.2f})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    with user_errors():
        main()
