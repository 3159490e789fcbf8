"""Per-step loss of this project and of the authors' release, trained side by side on the same
batches with the same random draws, from one random start: do their runs follow one trajectory?

    /work/wt/relvenv/bin/python bench/release_steps.py --release /work/wt/release --data /tmp/compare/data \
        --steps 60

Run it with a Python that imports both codes (the release's requirements and this project's).
`--data`: generated COCO-layout zips with category ids 1..C in our order (bench/release_compare.py
writes them to <out>/data). Each step takes one batch from our pipeline (dataset, augmentation,
sampler) and hands the same images and targets to both; before each step's loss both codes' torch
generator is set to the same state, so the matching and loss points are the same draws. The
release's side is its LightningModule driven by hand as Lightning drives it (its criterion and
`loss_total`, its AdamW groups and TwoStageWarmupPolySchedule, norm clipping at 0.01); ours is
`train.py`'s optimiser, lr schedule and criterion. Prints both losses per step and, at the end,
the largest parameter difference; the gap grows only from floating-point rounding (our AdamW is
the fused kernel, the release's the for-loop one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.release_compare import CLASS_NAMES, THINGS, save_start  # noqa: E402
from eomt.api import load_model  # noqa: E402
from eomt.config import compose  # noqa: E402
from eomt.data.coco import CocoPanoptic  # noqa: E402
from eomt.data.collate import collate_train  # noqa: E402
from eomt.data.sampler import ResumableSampler, SeededSamples  # noqa: E402
from eomt.data.transforms import TrainTransform  # noqa: E402
from eomt.training.lr_schedule import set_lr  # noqa: E402
from train import build_optimizer  # noqa: E402


def release_module(args, start: Path, total_steps: int):
    sys.path.insert(0, str(args.release))
    from models.eomt import EoMT
    from models.vit import ViT
    from training.mask_classification_panoptic import MaskClassificationPanoptic

    encoder = ViT((args.size, args.size), backbone_name=args.backbone, ckpt_path=str(start))
    network = EoMT(
        encoder,
        num_classes=len(CLASS_NAMES),
        num_q=args.queries,
        num_blocks=args.num_blocks,
        masked_attn_enabled=False,
    )
    module = MaskClassificationPanoptic(
        network=network,
        img_size=(args.size, args.size),
        num_classes=len(CLASS_NAMES),
        stuff_classes=list(range(len(THINGS), len(CLASS_NAMES))),
        attn_mask_annealing_enabled=False,
        lr=args.lr,
        warmup_steps=list(args.warmup),
        num_points=args.points,
        ckpt_path=str(start),
    )
    module._trainer = argparse.Namespace(estimated_stepping_batches=total_steps)  # what the schedule reads
    config = module.configure_optimizers()
    return module, config["optimizer"], config["lr_scheduler"]["scheduler"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("outputs/release_steps"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60, help="steps run (the schedule spans --total)")
    parser.add_argument("--total", type=int, default=300)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, nargs=2, default=[20, 40])
    parser.add_argument("--points", type=int, default=1024)
    parser.add_argument("--backbone", default="test_vit")
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [
        "dataset=synthetic",
        f"dataset.generator.size=[{args.size},{args.size}]",
        "model=tiny",
        f"model.backbone={args.backbone}",
        "model.backbone_kwargs=null",
        "model.masked_attn=false",
        f"model.num_blocks={args.num_blocks}",
        f"task.num_queries={args.queries}",
        f"schedule.lr={args.lr}",
        f"loss.num_points={args.points}",
    ]
    cfg = compose(overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    start_ours, start_release = save_start(args, overrides, args.seed, args.out)

    ours = load_model(cfg.model, start_ours).train()
    criterion = instantiate(cfg.loss)
    optimizer = build_optimizer(cfg, ours, torch.device("cpu"))
    release, release_optimizer, scheduler = release_module(args, start_release, args.total)
    release.train()

    dataset = CocoPanoptic(args.data, "train", transform=TrainTransform((args.size, args.size), (0.5, 2.0)))
    sampler = ResumableSampler(dataset, 1, 0, args.seed, args.batch)
    samples = SeededSamples(dataset, args.seed)
    keys = []
    for epoch in range(args.steps * args.batch // len(dataset) + 1):
        sampler.set_position(epoch, 0)
        keys += list(sampler)

    print(f"{'step':>5} {'ours':>10} {'release':>10} {'|diff|':>9}")
    for step in range(args.steps):
        batch = [samples[key] for key in keys[step * args.batch : (step + 1) * args.batch]]
        images, targets = collate_train(batch)
        targets = [{k: t[k] for k in ("masks", "labels")} for t in targets]

        set_lr(optimizer, step, args.total, args.warmup[0], args.warmup[1])
        torch.manual_seed(1000 + step)
        mask_logits, class_logits = ours(images.float() / 255)
        loss, _ = criterion(mask_logits, class_logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        torch.manual_seed(1000 + step)
        masks, classes = release(images.float())  # the release divides by 255 in forward
        losses = release.criterion(
            masks_queries_logits=masks[-1], class_queries_logits=classes[-1], targets=targets
        )
        release_loss = release.criterion.loss_total(losses, lambda *a, **k: None)
        release_loss.backward()
        torch.nn.utils.clip_grad_norm_(release.parameters(), 0.01)
        release_optimizer.step()
        scheduler.step()
        release_optimizer.zero_grad(set_to_none=True)
        print(
            f"{step:5d} {loss.item():10.5f} {release_loss.item():10.5f} {abs(loss.item() - release_loss.item()):9.2e}"
        )

    release_state = {
        k[len("network.") :]: v for k, v in release.state_dict().items() if k.startswith("network.")
    }
    ours_state = {k: v for k, v in ours.state_dict().items()}
    from eomt.model.weight_formats import AUTHORS_DINOV2

    converted = AUTHORS_DINOV2.to_ours({f"network.{k}": v for k, v in release_state.items()}).state
    worst = max((converted[k] - v).abs().max().item() for k, v in ours_state.items() if k in converted)
    print(f"largest parameter difference after {args.steps} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
