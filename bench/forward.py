"""Forward-pass benchmark of a network built from the config with random weights, per runtime.

    python bench/forward.py model=vit_l [overrides] --batch 1 --dtype bf16 --device cuda --iters 50
    python bench/forward.py model=vit_s model.img_size=[640,640] --device cpu --threads 2 \
        --runtime torch,torch-compile,onnxruntime [--reference /path/to/authors/checkout]

Prints GFLOPs per image (torch.utils.flop_counter) and, per runtime, images/s and the ratio to the first
runtime; on CUDA also peak memory. The runtimes run the same weights at the same size, timed in interleaved
rounds (round r times every runtime once) and summarised by the median round, so a busy machine slows them
alike. Runtimes:
- torch: eager PyTorch; torch-compile: torch.compile of it;
- onnxruntime: the network exported by eomt.export, in ONNX Runtime (`--ort-opt` graph optimisation levels,
  comma-separated, one runtime each; needs the `export` extra);
- openvino: the same .onnx file in OpenVINO on the CPU (`openvino@bf16`: at bf16, on CPUs with native bf16);
- release: with `--reference DIR`, the authors' model code from DIR (a checkout holding models/), loaded
  with the same weights: the yardstick of our eager forward. Nothing else in the project imports it.
A PyTorch or OpenVINO runtime takes its own dtype as a suffix, e.g. `--runtime torch,torch@bf16,torch-compile@bf16`
(fp32 eager against bf16 autocast on the CPU, in one run); without one it runs at `--dtype`.
Masked attention is off unless an override turns it on (`model.masked_attn=true`): that is how EoMT runs
at inference.
"""

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from release_network import release_network
from torch import nn

from eomt.compilation import compile_for_inference
from eomt.config import compose
from eomt.device import AMP_DTYPES
from eomt.errors import user_errors
from eomt.export import build_metadata, export
from eomt.inference.runtime import ORT_OPTIMIZATION, OnnxRuntimeNetwork, OpenVinoNetwork
from eomt.model import build_model
from eomt.profiling import count_params, gflops_per_image, images_per_second

RUNTIMES = ("torch", "torch-compile", "onnxruntime", "openvino", "release")


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
    parser.add_argument(
        "--runtime", default="torch", help=f"comma-separated, timed side by side: {'|'.join(RUNTIMES)}"
    )
    parser.add_argument("--compile", action="store_true", help="same as --runtime torch-compile")
    parser.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (CUDA graphs included)"
    )
    parser.add_argument("--json", help="also write the measurement (first runtime) to this JSON file")
    parser.add_argument(
        "--ort-opt",
        default="all",
        help=f"ONNX Runtime graph optimisation: {'|'.join(ORT_OPTIMIZATION)}, comma-separated",
    )
    parser.add_argument("--reference", type=Path, help="a checkout of the authors' release (runtime release)")
    parser.add_argument("--threads", type=int, help="CPU threads of every runtime (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds")
    parser.add_argument("--iters", type=int, default=20, help="timed forward passes per runtime and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes (compilation included)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument(
        "--profile", action="store_true", help="print each PyTorch runtime's top operators (torch.profiler)"
    )
    return parser.parse_intermixed_args()


def under_autocast(network: Callable, device: torch.device, dtype: str) -> Callable:
    """`network` run under autocast to `dtype` (fp32: as it is)."""
    amp = AMP_DTYPES[dtype]
    if amp is None:
        return network

    def run(images: torch.Tensor):
        with torch.autocast(device.type, dtype=amp):
            return network(images)

    return run


def build_runtimes(args, cfg, model: nn.Module, folder: Path) -> dict[str, Callable]:
    specs = [n.strip() for n in args.runtime.split(",") if n.strip()]
    if args.compile and "torch-compile" not in specs:
        specs.append("torch-compile")
    device = next(model.parameters()).device
    onnx_file = folder / "network.onnx"
    runtimes: dict[str, Callable] = {}
    for spec in specs:
        name, _, dtype = spec.partition("@")
        if dtype and dtype not in AMP_DTYPES:
            raise SystemExit(f"error: --runtime {spec}: {dtype} is not one of {'|'.join(AMP_DTYPES)}")
        if dtype and name == "onnxruntime":
            raise SystemExit(f"error: --runtime {spec}: onnxruntime runs the exported fp32 file as it is")
        if name in ("onnxruntime", "openvino") and not onnx_file.exists():
            export(model, build_metadata(cfg, None, "float32"), onnx_file)
        dtype = dtype or args.dtype
        label = name if dtype == "fp32" else f"{name}@{dtype}"
        if name == "torch":
            runtimes[label] = under_autocast(model, device, dtype)
        elif name == "torch-compile":
            runtimes[label] = under_autocast(
                compile_for_inference(model, mode=args.compile_mode), device, dtype
            )
        elif name == "onnxruntime":
            for level in args.ort_opt.split(","):
                runtimes[f"onnxruntime[{level}]"] = OnnxRuntimeNetwork(
                    onnx_file, args.device, threads=args.threads, optimization=level
                )
        elif name == "openvino":
            runtimes[label] = OpenVinoNetwork(onnx_file, args.device, threads=args.threads, precision=dtype)
        elif name == "release":
            if args.reference is None:
                raise SystemExit(
                    "error: --runtime release needs --reference <checkout of the authors' release>"
                )
            runtimes[label] = under_autocast(release_network(args.reference, model, cfg), device, dtype)
        else:
            raise SystemExit(f"error: --runtime {name} is not one of {'|'.join(RUNTIMES)}")
    return runtimes


@torch.no_grad()
def print_profile(name: str, network: nn.Module, images: torch.Tensor) -> None:
    """One forward pass under torch.profiler: operator calls and self CPU time, top operators first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        network(images)
    events = prof.key_averages()
    calls = sum(e.count for e in events)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    print(f"--- {name}: {calls} operator calls, {total:.1f} ms self CPU")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(["model.masked_attn=false", *args.overrides, "model.pretrained=false"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    images = torch.rand(args.batch, 3, *model.img_size, device=device)

    with tempfile.TemporaryDirectory() as folder:
        gflops = None if args.no_flops else gflops_per_image(model, images)
        runtimes = build_runtimes(args, cfg, model, Path(folder))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rates: dict[str, list[float]] = {name: [] for name in runtimes}
        for round_ in range(args.rounds):
            order = list(runtimes.items())
            for name, network in order if round_ % 2 == 0 else order[::-1]:  # no runtime always first
                warmup = args.warmup if round_ == 0 else 1
                rates[name].append(images_per_second(network, images, args.iters, warmup))

        if args.profile:
            for name, network in runtimes.items():
                if name.partition("@")[0] in ("torch", "release"):
                    print_profile(name, network, images)

    params = count_params(model) / 1e6
    flops = "" if gflops is None else f", {gflops:.1f} GFLOPs/image"
    print(
        f"{cfg.model.name} {model.img_size[0]}x{model.img_size[1]} batch {args.batch} {args.dtype} "
        f"{device.type} threads {torch.get_num_threads()} masked_attn={model.masked_attn}: "
        f"{params:.1f}M params{flops}; {args.rounds} rounds x {args.iters} iters"
    )
    first = next(iter(rates.values()))
    for name, values in rates.items():
        ratio = statistics.median(v / f for v, f in zip(values, first, strict=True))  # per round: same load
        rounds = " ".join(f"{v:.3g}" for v in values)
        print(f"  {name:22s} {statistics.median(values):8.3g} images/s {ratio:6.2f}x   (rounds: {rounds})")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if args.json:
        label, values = next(iter(rates.items()))
        name, _, dtype = label.partition("@")
        record = dict(
            model=cfg.model.name,
            img_size=list(model.img_size),
            batch=args.batch,
            dtype=dtype or "fp32",
            device=device.type,
            runtime=name,
            compile=(args.compile_mode or "default") if name == "torch-compile" else "off",
            masked_attn=bool(model.masked_attn),
            params_m=params,
            gflops=gflops,
            images_per_s=statistics.median(values),
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else None,
        )
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    with user_errors():
        main()
