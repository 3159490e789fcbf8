"""The first look at a CUDA GPU: forward and training speed, an end-to-end demo, the `gpu` tests.

    bash bench/gpu_check.sh [--out outputs/gpu_check] [--budget-s 450] [--dry-run]

Runs each measurement in its own process (bench/forward.py, bench/train_step.py, train.py, pytest) with
a time limit, most important first, and stops starting new ones when the time budget is spent, so that
one GPU finishes in under 8 minutes. Writes <out>/gpu_check.json (every result and every step's status)
and <out>/gpu_check.md (the summary). A step that fails or times out is reported, not fatal.

- forward, batch 1, 640 px, bf16: ViT-L and ViT-S, eager and compiled, masked attention off and on, and
  ViT-L with `mode=max-autotune` (CUDA graphs): images/s, GFLOPs, peak memory;
- a training step, ViT-L 640 bf16, eager and compiled (regional) side by side, masked attention mid-annealing
  and off: images/s, peak memory, first-step compile time, graphs, recompilations and graph breaks;
- the memory planner (`python -m eomt.plan`) against torch.cuda.max_memory_allocated of a real step,
  ViT-L 640 bf16 with 4 images, without and with activation checkpointing (bench/plan_check.py);
- `experiment=demo` trained end to end on the GPU (bf16, compiled) and its PQ;
- `pytest -m gpu`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_STEP_S = 30  # a step is not started with less of the budget left
GOAL_IMAGES_PER_S = 200.0  # ViT-L 640 bf16 batch 1 on an H100-class GPU (the paper: 128 FPS on an H100)


@dataclass
class Step:
    name: str
    kind: str  # forward | train_step | plan_check | demo | tests
    cmd: list[str]
    timeout_s: int
    result_file: str | None = None
    status: str = "pending"  # ok | failed | timeout | skipped (budget)
    seconds: float = 0.0
    detail: str = ""
    result: dict | list | None = field(default=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check", help="results folder")
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="every step ends within this many seconds of the start"
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs every step")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def plan(out: Path, python: str) -> list[Step]:
    """Every step, most important first."""
    steps: list[Step] = []

    def forward(model: str, compile_mode: str, masked: bool, timeout_s: int) -> None:
        name = f"forward {model} {compile_mode} masked={'on' if masked else 'off'}"
        result = out / f"forward_{model}_{compile_mode}_{'masked' if masked else 'plain'}.json"
        cmd = [python, "bench/forward.py", f"model={model}", f"model.masked_attn={str(masked).lower()}"]
        cmd += ["--batch", "1", "--dtype", "bf16", "--device", "cuda", "--iters", "50", "--warmup", "5"]
        if compile_mode != "eager":
            cmd += ["--runtime", "torch-compile"]
            cmd += [] if compile_mode == "default" else ["--compile-mode", compile_mode]
        cmd += ["--json", str(result)]
        steps.append(Step(name, "forward", cmd, timeout_s, str(result)))

    forward("vit_l", "eager", False, 90)
    forward("vit_l", "default", False, 180)
    train_json = out / "train_step_vit_l.json"
    steps.append(
        Step(
            "train step vit_l compile off/on",
            "train_step",
            [python, "bench/train_step.py", "model=vit_l", "dataset.crop_size=[640,640]", "--device", "cuda"]
            + ["--dtype", "bf16", "--masked", "annealing,off", "--runtime", "eager,compiled", "--batch", "4"]
            + ["--steps", "5", "--rounds", "2", "--warmup", "2", "--json", str(train_json)],
            240,
            str(train_json),
        )
    )

    def plan_check(checkpointing: str) -> None:
        result = out / f"plan_check_vit_l_{checkpointing}.json"
        cmd = [python, "bench/plan_check.py", "experiment=coco_panoptic_vit_l_640", "trainer.batch_size=4"]
        cmd += [f"trainer.activation_checkpointing={checkpointing}", "--json", str(result)]
        name = f"memory plan vs measured vit_l 640 checkpointing={checkpointing}"
        steps.append(Step(name, "plan_check", cmd, 150, str(result)))

    plan_check("none")
    demo_dir = out / "demo" / "0_demo"
    steps.append(
        Step(
            "demo end to end (bf16, compiled)",
            "demo",
            [python, "train.py", "experiment=demo", "trainer.device=cuda", "trainer.precision=bf16"]
            + ["trainer.compile=true", "trainer.resume=never", f"hydra.run.dir={demo_dir}"],
            240,
            str(demo_dir / "metrics.json"),
        )
    )
    steps.append(
        Step(
            "pytest -m gpu",
            "tests",
            [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
            180,
        )
    )
    plan_check("blocks")
    forward("vit_l", "eager", True, 90)
    forward("vit_l", "default", True, 180)
    forward("vit_s", "eager", False, 60)
    forward("vit_s", "default", False, 120)
    forward("vit_s", "eager", True, 60)
    forward("vit_s", "default", True, 120)
    forward("vit_l", "max-autotune", False, 400)
    return steps


def time_allowed(step: Step, elapsed: float, budget_s: float) -> float:
    """The step's own limit, cut to what is left of the budget (0: do not start it)."""
    left = budget_s - elapsed
    return 0.0 if left < MIN_STEP_S else min(float(step.timeout_s), left)


def run_step(step: Step, timeout_s: float) -> None:
    start = time.monotonic()
    try:
        done = subprocess.run(step.cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        step.status, step.detail = "timeout", f"over {timeout_s:.0f} s"
    else:
        output = (done.stdout + done.stderr).strip()
        step.status = "ok" if done.returncode == 0 else "failed"
        if step.kind == "tests":
            step.detail = (output.splitlines() or [""])[-1]  # pytest's summary line
            step.result = pytest_counts(step.detail)
        elif done.returncode != 0:
            step.detail = (output.splitlines() or ["(no output)"])[-1][:300]
    step.seconds = time.monotonic() - start
    if step.status == "ok" and step.result_file and Path(step.result_file).exists():
        step.result = json.loads(Path(step.result_file).read_text())


def pytest_counts(summary: str) -> dict[str, int]:
    """pytest's last line ("3 passed, 1 skipped in 2.0s") as counts."""
    return {
        word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)
    }


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def summary_markdown(report: dict) -> str:
    """The markdown summary of a gpu_check.json report."""
    lines = [f"# GPU check: {report.get('device', '?')}", ""]
    lines += [
        f"torch {report.get('torch', '?')}, CUDA {report.get('cuda', '?')}, {report.get('seconds', 0):.0f} s in all",
        "",
    ]
    steps = report["steps"]
    forward = [s for s in steps if s["kind"] == "forward" and s["status"] == "ok"]
    if forward:
        lines += ["## Forward, batch 1, bf16", ""]
        lines += [
            "| model | size | compile | masked attn | images/s | GFLOPs | peak memory (GiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in forward:
            r = s["result"]
            size = "x".join(str(v) for v in r["img_size"])
            lines.append(
                f"| {r['model']} | {size} | {r['compile']} | {'on' if r['masked_attn'] else 'off'} | "
                f"{_fmt(r['images_per_s'])} | {_fmt(r['gflops'])} | {_fmt(r['peak_memory_gib'], '.2f')} |"
            )
        best = max(
            (
                s["result"]["images_per_s"]
                for s in forward
                if s["result"]["model"] == "vit_l" and not s["result"]["masked_attn"]
            ),
            default=None,
        )
        if best is not None:
            lines += [
                "",
                f"ViT-L best: {best:.1f} images/s, {best / GOAL_IMAGES_PER_S:.2f}x the goal of {GOAL_IMAGES_PER_S:.0f}.",
            ]
        lines.append("")
    for s in steps:
        if s["kind"] == "train_step" and s["status"] == "ok":
            lines += [
                "## Training step, ViT-L 640, bf16",
                "",
                "| runtime | masked | batch | images/s | ratio | peak memory (GiB) | first step (s) | graphs | "
                "recompiles | graph breaks |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in s["result"]:
                lines.append(
                    f"| {r['runtime']} | {r['masked']} | {r['batch']} | {_fmt(r['images_per_s'], '.2f')} | "
                    f"{_fmt(r['ratio'], '.2f')}x | {_fmt(r['peak_memory_gib'], '.2f')} | {_fmt(r['first_step_s'])} | "
                    f"{r['graphs']} | {r['recompiles']} | {r['graph_breaks']} |"
                )
            lines.append("")
        if s["kind"] == "plan_check" and s["status"] == "ok":
            r = s["result"]
            lines += [
                f"## Memory planner, ViT-L 640, {r['micro_batch']} images, checkpointing {r['checkpointing']}",
                "",
                f"estimate {r['estimate_gib']:.2f} GiB, measured {r['measured_gib']:.2f} GiB "
                f"(estimate / measured {r['ratio']:.2f})",
                "",
            ]
        if s["kind"] == "demo" and s["status"] == "ok":
            pq = (s["result"] or {}).get("metrics", {}).get("PQ")
            lines += [
                "## Demo end to end (bf16, compiled)",
                "",
                f"PQ {_fmt(pq, '.2f')}, trained and evaluated in {s['seconds']:.0f} s",
                "",
            ]
        if s["kind"] == "tests":
            lines += ["## `pytest -m gpu`", "", s["detail"] or s["status"], ""]
    lines += ["## Steps", "", "| step | status | seconds | detail |", "|---|---|---|---|"]
    for s in steps:
        lines.append(
            f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['detail'].replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def device_facts() -> dict[str, str]:
    import torch

    facts = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    facts["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return facts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args.out, args.python)
    if args.dry_run:
        for step in steps:
            print(f"[{step.timeout_s:>3} s] {step.name}: {' '.join(step.cmd)}")
        return 0
    facts = device_facts()
    if facts["device"] == "no CUDA device":
        raise SystemExit("error: bench/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for step in steps:
        allowed = time_allowed(step, time.monotonic() - start, args.budget_s)
        if not allowed:
            step.status = "skipped (budget)"
            continue
        print(f"[{time.monotonic() - start:5.0f} s] {step.name} ...", flush=True)
        run_step(step, allowed)
        print(f"        {step.status} in {step.seconds:.0f} s {step.detail}", flush=True)
    report = {**facts, "seconds": time.monotonic() - start, "steps": [asdict(s) for s in steps]}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(summary_markdown(report))
    print(f"wrote {args.out / 'gpu_check.md'} and gpu_check.json")
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
