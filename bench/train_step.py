"""Training throughput: images/s and peak memory of full optimisation steps (forward, loss with
matching, backward, clip, AdamW) on random images and random target masks.

    python bench/train_step.py model=tiny --batch 8 --steps 5
    python bench/train_step.py model=vit_l dataset.crop_size=[640,640] --device cuda --dtype bf16 --compile both

Compile on/off are measured side by side in one run (`--compile both`), so their ratio is fair.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hydra.utils import instantiate

from eomt.config import compose
from eomt.device import AMP_DTYPES
from eomt.errors import user_errors
from eomt.model import build_model
from eomt.training import param_groups


def random_targets(batch: int, size: tuple[int, int], num_classes: int, per_image: int, device) -> list[dict]:
    h, w = size
    targets = []
    for _ in range(batch):
        masks = torch.zeros(per_image, h, w, dtype=torch.bool, device=device)
        for j in range(per_image):
            y, x = torch.randint(0, h // 2, ()).item(), torch.randint(0, w // 2, ()).item()
            masks[j, y : y + h // 3, x : x + w // 3] = True
        labels = torch.randint(0, num_classes, (per_image,), device=device)
        targets.append({"masks": masks, "labels": labels})
    return targets


def measure(cfg, args, compiled: bool) -> tuple[float, float]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    criterion = instantiate(cfg.loss).to(device)
    groups = param_groups(model, lr=1e-4, weight_decay=0.05, layer_decay=0.8, decay_query_blocks=True)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device.type in ("cuda", "cpu"))  # as train.py
    forward = torch.compile(model) if compiled else model
    amp = AMP_DTYPES[args.dtype] if device.type == "cuda" else None
    size = tuple(cfg.model.img_size)
    images = torch.rand(args.batch, 3, *size, device=device)
    targets = random_targets(args.batch, size, cfg.model.num_classes, 5, device)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            mask_logits, class_logits = forward(images)
        loss, _ = criterion(mask_logits, class_logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return args.batch * args.steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model=vit_s dataset.crop_size=[640,640]"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(AMP_DTYPES), default="bf16")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    cfg = compose([*args.overrides, "model.pretrained=false"])
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(
        f"model={cfg.model.name} crop={list(cfg.model.img_size)} batch={args.batch} device={args.device} dtype={args.dtype}"
    )
    print("| compile | images/s | peak GPU memory (GiB) |\n|---|---|---|")
    records = []
    for compiled in modes:
        rate, peak = measure(cfg, args, compiled)
        print(f"| {compiled} | {rate:.2f} | {peak:.2f} |")
        records.append(
            dict(
                model=cfg.model.name,
                img_size=list(cfg.model.img_size),
                batch=args.batch,
                dtype=args.dtype,
                device=args.device,
                compile=compiled,
                images_per_s=rate,
                peak_memory_gib=None if peak != peak else peak,  # NaN off CUDA
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    with user_errors():
        main()
