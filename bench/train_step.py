"""Training throughput, side by side in one run: full optimisation steps (forward, loss with matching,
backward, clip, AdamW) on random images and masks, for each runtime, precision and masking mode.

    python bench/train_step.py model=vit_s dataset.crop_size=[256,256] --dtype fp32,bf16 --masked annealing,off \\
        --runtime eager,compiled,release-compiled --reference ../eomt-release
    python bench/train_step.py model=vit_l dataset.crop_size=[640,640] --device cuda --dtype bf16 --runtime eager,compiled

Runtimes:
- eager: our network as it is; compiled: our training path (`eomt.compilation.compile_for_training`:
  regional compilation, as train.py with trainer.compile=true);
- release, release-compiled: the authors' network (from `--reference`, a checkout holding models/) with the
  same weights, eager or under torch.compile as their main.py compiles their module.
All runtimes share one loss (ours, equal to the release's on the same inputs), optimiser and clipping, so
the ratios compare the networks' forward and backward.

Masking: `annealing` keeps masked attention on with every block's probability taken from the published
schedule in the middle of training, stepping on every step (so one block is being annealed and its
probability changes every step, as in a real run); `off` trains without masked attention.

Each runtime's first step (compilation included) is timed alone (`first_step_s`), with what Dynamo
compiled up to the end of its warm-up (graphs, recompilations, graph breaks); then `--rounds` rounds
of `--steps` steps run the runtimes interleaved, and the table gives the median images/s and the median
of the per-round ratios to the first runtime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from release_network import release_network
from torch import nn

from eomt.compilation import CompileStats, CompileSummary, compile_for_training
from eomt.config import compose
from eomt.device import AMP_DTYPES
from eomt.errors import user_errors
from eomt.model import build_model
from eomt.training import annealing_probs, annealing_windows, param_groups

RUNTIMES = ("eager", "compiled", "release", "release-compiled")
SCHEDULE_STEPS = 1000  # the annealing schedule the probabilities come from; steps start half way


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


class _ReleaseModule(nn.Module):
    """What the release's main.py compiles: a module whose forward calls the network."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor):
        return self.network(images)


class Trainer:
    """One runtime's network, optimiser and step on fixed images and targets."""

    def __init__(self, runtime: str, cfg, args, dtype: str, masked: str):
        device = torch.device(args.device)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).train()
        model.masked_attn = masked != "off"
        if runtime.startswith("release"):
            network = release_network(args.reference, model, cfg).train()
            params = network
            self.set_probs = lambda probs: network.attn_mask_probs.copy_(torch.tensor(probs))
            forward = torch.compile(_ReleaseModule(network)) if runtime == "release-compiled" else network
        else:
            params = model
            self.set_probs = model.set_attn_mask_probs
            if runtime == "compiled":
                options = {"mode": args.compile_mode} if args.compile_mode else {}
                compile_for_training(model, **options, **({"dynamic": False} if args.static else {}))
            forward = model
        self.forward, self.params, self.device = forward, params, device
        self.amp = AMP_DTYPES[dtype]
        self.criterion = instantiate(cfg.loss).to(device)
        groups = param_groups(model, lr=1e-4, weight_decay=0.05, layer_decay=0.8, decay_query_blocks=True)
        if runtime.startswith("release"):  # the same groups, over the release network's parameters
            by_name = dict(network.named_parameters())
            names = {id(p): n for n, p in model.named_parameters()}
            for group in groups:
                group["params"] = [by_name[_release_name(names[id(p)])] for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-4, fused=device.type in ("cuda", "cpu"))
        size = tuple(cfg.model.img_size)
        self.images = torch.rand(args.batch, 3, *size, device=device)
        self.targets = random_targets(args.batch, size, cfg.model.num_classes, 5, device)
        starts, ends = annealing_windows(SCHEDULE_STEPS, model.num_blocks)
        self.probs = lambda step: annealing_probs(SCHEDULE_STEPS // 2 + step, starts, ends, 0.9)
        self.masked = masked
        self.step_count = 0
        self.peak_gib = float("nan")

    def step(self) -> None:
        if self.masked == "annealing":
            self.set_probs(self.probs(self.step_count))
        self.step_count += 1
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            mask_logits, class_logits = self.forward(self.images)
        loss, _ = self.criterion(mask_logits, class_logits, self.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params.parameters(), 0.01)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Seconds for `steps` steps (and the peak memory they reached, on CUDA)."""
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self._sync()
        if self.device.type == "cuda":
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated() / 2**30)
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _release_name(ours: str) -> str:
    return "encoder." + ours if ours.startswith("backbone.") else ours


def measure(cfg, args, dtype: str, masked: str, runtimes: list[str]) -> list[dict]:
    trainers: dict[str, Trainer] = {}
    first: dict[str, float] = {}
    compiled: dict[str, CompileSummary] = {}
    for runtime in runtimes:
        stats = CompileStats()  # no torch._dynamo.reset(): it would drop the runtimes built before
        trainers[runtime] = Trainer(runtime, cfg, args, dtype, masked)
        first[runtime] = trainers[runtime].timed(1)
        trainers[runtime].timed(args.warmup)
        compiled[runtime] = stats.summary()
    timed_stats = CompileStats()
    seconds: dict[str, list[float]] = {r: [] for r in runtimes}
    for _ in range(args.rounds):
        for runtime in runtimes:
            seconds[runtime].append(trainers[runtime].timed(args.steps))
    late = timed_stats.summary()
    if late.frames:
        print(
            f"note: compilations during the timed rounds (their time is in the rates): {dict(late.per_function)}"
        )
    base = seconds[runtimes[0]]
    records = []
    for runtime in runtimes:
        rates = [args.batch * args.steps / s for s in seconds[runtime]]
        ratios = [b / s for b, s in zip(base, seconds[runtime], strict=True)]
        records.append(
            dict(
                model=cfg.model.name,
                img_size=list(cfg.model.img_size),
                batch=args.batch,
                dtype=dtype,
                masked=masked,
                runtime=runtime,
                device=args.device,
                images_per_s=statistics.median(rates),
                ratio=statistics.median(ratios),
                first_step_s=first[runtime],
                peak_memory_gib=None
                if trainers[runtime].peak_gib != trainers[runtime].peak_gib
                else trainers[runtime].peak_gib,
                graphs=compiled[runtime].graphs,
                compilations=compiled[runtime].frames,
                recompiles=compiled[runtime].recompiles,
                graph_breaks=compiled[runtime].graph_breaks,
                compile_s=compiled[runtime].seconds,
            )
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model=vit_s dataset.crop_size=[640,640]"
    )
    parser.add_argument(
        "--runtime", default="eager,compiled", help=f"comma-separated, of {', '.join(RUNTIMES)}"
    )
    parser.add_argument(
        "--reference", type=Path, help="a checkout of the authors' release (runtimes release*)"
    )
    parser.add_argument("--dtype", default="bf16", help="comma-separated, of fp32, bf16, fp16")
    parser.add_argument("--masked", default="annealing", help="comma-separated, of annealing, off")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per runtime and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile-mode", help="torch.compile mode for runtime compiled (e.g. max-autotune)")
    parser.add_argument(
        "--static", action="store_true", help="runtime compiled with dynamic=False (one graph per shape)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise SystemExit(f"error: --runtime {','.join(unknown)}: use any of {', '.join(RUNTIMES)}")
    if any(r.startswith("release") for r in runtimes) and args.reference is None:
        raise SystemExit("error: --runtime release* needs --reference <checkout of the authors' release>")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose([*args.overrides, "model.pretrained=false"])
    print(
        f"model={cfg.model.name} crop={list(cfg.model.img_size)} batch={args.batch} device={args.device} "
        f"threads={torch.get_num_threads()} rounds={args.rounds}x{args.steps} steps"
    )
    print(
        "| dtype | masked | runtime | images/s | ratio | first step (s) | graphs | recompiles | graph breaks |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    records = []
    for dtype in args.dtype.split(","):
        for masked in args.masked.split(","):
            for r in measure(cfg, args, dtype, masked, runtimes):
                records.append(r)
                print(
                    f"| {dtype} | {masked} | {r['runtime']} | {r['images_per_s']:.3g} | {r['ratio']:.2f}x | "
                    f"{r['first_step_s']:.1f} | {r['graphs']} | {r['recompiles']} | {r['graph_breaks']} |",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    with user_errors():
        main()
