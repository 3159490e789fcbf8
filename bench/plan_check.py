"""The memory planner against a real step on a GPU: `eomt.plan`'s estimate and torch.cuda.max_memory_allocated
of one training step (eager, one GPU, the planner's synthetic batch), side by side.

    python bench/plan_check.py experiment=coco_panoptic_vit_l_640 trainer.batch_size=4 [--targets 50] [--json f]

The network is randomly initialised (nothing is downloaded); the first step creates AdamW's moments and
the second is measured, as the planner counts a step in steady state. Run by bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import instantiate

from eomt import plan
from eomt.config import compose
from eomt.errors import user_errors
from eomt.model import build_model
from eomt.parallel import apply_activation_checkpointing, checkpoint_every

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. experiment=coco_panoptic_vit_l_640"
    )
    parser.add_argument("--targets", type=int, default=50, help="masks per image")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/plan_check.py needs a CUDA GPU")
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
