"""The paper's Table 1 path at one size in one run: parameters, GFLOPs and inference images/s of each
step from ViT-Adapter + Mask2Former (step 0) down to EoMT (step 5).

    python bench/components.py                                 # ViT-S at 256 px on the CPU
    python bench/components.py --m2f-model m2f_vit_l --eomt-model vit_l --size 640 --device cuda --compile

Every step is composed exactly as the sweep trains it (`+component_step=...`, conf/component_step/),
with the backbone size picked by --m2f-model / --eomt-model and random weights. Step 4 infers with
masked attention (attention-mask probabilities 1), step 5 without (what annealing makes possible).
The ratios between steps are what the paper's table shows; absolute numbers depend on the machine.
GFLOPs come from torch.utils.flop_counter (a multiply-add counts 2; grid_sample is not counted).
"""

from __future__ import annotations

import argparse

import torch

from eomt.config import compose
from eomt.errors import user_errors
from eomt.model import build_model
from eomt.profiling import count_params, gflops_per_image, images_per_second

# (component_step option, the overrides that make it an inference model, which model group)
STEPS = [
    ("step0_vit_adapter", [], "m2f"),
    ("step1_no_adapter", [], "m2f"),
    ("step2_no_pixel_decoder", [], "m2f"),
    ("step3_single_scale", [], "m2f"),
    ("step4_eomt_masked", [], "eomt"),
    ("step5_eomt", ["model.masked_attn=false"], "eomt"),  # after annealing, inference needs no masks
]


def build(step: str, extra: list[str], model: str, args: argparse.Namespace) -> torch.nn.Module:
    cfg = compose(
        [
            f"+component_step={step}",
            f"model={model}",
            "model.pretrained=false",
            f"dataset.crop_size=[{args.size},{args.size}]",
            *extra,
            *args.overrides,
        ]
    )
    torch.manual_seed(0)
    return build_model(cfg.model).to(args.device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every step, e.g. model.num_queries=100"
    )
    parser.add_argument("--m2f-model", default="m2f_vit_s", help="model config of steps 0-3")
    parser.add_argument("--eomt-model", default="vit_s", help="model config of steps 4-5")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (GPU timings)")
    args = parser.parse_args()

    models = {"m2f": args.m2f_model, "eomt": args.eomt_model}
    print(f"{args.m2f_model} / {args.eomt_model} at {args.size}px, batch {args.batch}, {args.device}")
    print(f"{'step':<24}{'params (M)':>12}{'GFLOPs':>10}{'images/s':>10}{'vs step 0':>11}")
    base = None
    for step, extra, kind in STEPS:
        model = build(step, extra, models[kind], args)
        images = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
        params = count_params(model) / 1e6
        gflops = gflops_per_image(model, images)
        forward = torch.compile(model) if args.compile else model
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
            speed = images_per_second(forward, images, args.iters, args.warmup)
        base = base or speed
        print(f"{step:<24}{params:>12.1f}{gflops:>10.1f}{speed:>10.2f}{speed / base:>10.2f}x", flush=True)


if __name__ == "__main__":
    with user_errors():
        main()
