"""Forward-pass benchmark of a network built from the config with random weights.

    python bench/forward.py model=vit_l [overrides] --batch 1 --compile --dtype bf16 --device cuda --iters 50

Prints images/s, GFLOPs per image (torch.utils.flop_counter) and, on CUDA, peak memory. Masked attention
is off unless an override turns it on (`model.masked_attn=true`): that is how EoMT runs at inference.
"""

import argparse
import json

import torch

from eomt.config import compose
from eomt.device import AMP_DTYPES
from eomt.errors import user_errors
from eomt.model import build_model
from eomt.profiling import count_params, gflops_per_image, images_per_second


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model=vit_s model.img_size=[640,640]"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--dtype", choices=sorted(AMP_DTYPES), default="fp32", help="autocast dtype (fp32: none)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network first")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (CUDA graphs included)"
    )
    parser.add_argument("--json", help="also write the measurement to this JSON file")
    parser.add_argument("--iters", type=int, default=20, help="timed forward passes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes (compilation included)")
    return parser.parse_intermixed_args()


def main() -> None:
    args = parse_args()
    cfg = compose(["model.masked_attn=false", *args.overrides, "model.pretrained=false"])
    device = torch.device(args.device)
    model = build_model(cfg.model).to(device).eval()
    images = torch.rand(args.batch, 3, *model.img_size, device=device)
    amp = AMP_DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    with autocast:
        gflops = gflops_per_image(model, images)
        network = torch.compile(model, mode=args.compile_mode) if args.compile else model
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rate = images_per_second(network, images, args.iters, args.warmup)

    params = count_params(model) / 1e6
    print(
        f"{cfg.model.name} {model.img_size[0]}x{model.img_size[1]} batch {args.batch} {args.dtype} "
        f"{device.type}{' compiled' if args.compile else ''} masked_attn={model.masked_attn}: "
        f"{params:.1f}M params, {gflops:.1f} GFLOPs/image, {rate:.3g} images/s"
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if peak is not None:
        print(f"peak memory {peak:.2f} GiB")
    if args.json:
        record = dict(
            model=cfg.model.name,
            img_size=list(model.img_size),
            batch=args.batch,
            dtype=args.dtype,
            device=device.type,
            compile=(args.compile_mode or "default") if args.compile else "off",
            masked_attn=bool(model.masked_attn),
            params_m=params,
            gflops=gflops,
            images_per_s=rate,
            peak_memory_gib=peak,
        )
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    with user_errors():
        main()
