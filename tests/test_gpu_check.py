"""bench/gpu_check.sh's CPU-checkable parts: its arguments, its plan, and the summary it writes."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_arguments_and_dry_run_list_every_measurement_the_issue_asks_for(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--budget-s", "100"])
    assert args.out == tmp_path and args.budget_s == 100
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget-s", "0"])
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    names = [line.split("] ", 1)[1].split(":")[0] for line in done.stdout.splitlines()]
    for model in ("vit_l", "vit_s"):
        for mode in ("eager", "default"):
            for masked in ("off", "on"):
                assert f"forward {model} {mode} masked={masked}" in names
    assert "forward vit_l max-autotune masked=off" in names
    for checkpointing in ("none", "blocks"):
        assert f"memory plan vs measured vit_l 640 checkpointing={checkpointing}" in names
    assert {"train step vit_l compile off/on", "demo end to end (bf16, compiled)", "pytest -m gpu"} <= set(
        names
    )

    # Under 8 minutes whatever the GPU does: every step's limit is cut to what is left of the budget.
    step = gpu_check.plan(tmp_path, "python")[1]
    assert gpu_check.time_allowed(step, elapsed=0, budget_s=450) == step.timeout_s
    assert gpu_check.time_allowed(step, elapsed=400, budget_s=450) == 50
    assert gpu_check.time_allowed(step, elapsed=440, budget_s=450) == 0
    assert gpu_check.parse_args([]).budget_s < 8 * 60


def _report() -> dict:
    forward = dict(
        img_size=[640, 640], batch=1, dtype="bf16", device="cuda", params_m=300.0, peak_memory_gib=1.5
    )
    steps = [
        gpu_check.Step(
            "forward vit_l eager masked=off",
            "forward",
            [],
            1,
            status="ok",
            seconds=12,
            result={
                **forward,
                "model": "vit_l",
                "compile": "off",
                "masked_attn": False,
                "gflops": 721.4,
                "images_per_s": 80.0,
            },
        ),
        gpu_check.Step(
            "forward vit_l default masked=off",
            "forward",
            [],
            1,
            status="ok",
            seconds=60,
            result={
                **forward,
                "model": "vit_l",
                "compile": "default",
                "masked_attn": False,
                "gflops": 721.4,
                "images_per_s": 150.0,
            },
        ),
        gpu_check.Step(
            "forward vit_l default masked=on",
            "forward",
            [],
            1,
            status="timeout",
            seconds=180,
            detail="over 180 s",
        ),
        gpu_check.Step(
            "train step vit_l compile off/on",
            "train_step",
            [],
            1,
            status="ok",
            seconds=90,
            result=[
                {
                    "runtime": r,
                    "masked": "annealing",
                    "batch": 4,
                    "images_per_s": rate,
                    "ratio": rate / 10.0,
                    "peak_memory_gib": peak,
                    "first_step_s": first,
                    "graphs": graphs,
                    "recompiles": recompiles,
                    "graph_breaks": 0,
                }
                for r, rate, peak, first, graphs, recompiles in (
                    ("eager", 10.0, 30.0, 2.0, 0, 0),
                    ("compiled", 14.0, 25.0, 61.5, 9, 4),
                )
            ],
        ),
        gpu_check.Step(
            "demo end to end (bf16, compiled)",
            "demo",
            [],
            1,
            status="ok",
            seconds=100,
            result={"metrics": {"PQ": 41.25}},
        ),
        gpu_check.Step(
            "pytest -m gpu",
            "tests",
            [],
            1,
            status="ok",
            seconds=30,
            detail="7 passed, 2 deselected in 30.0s",
            result=gpu_check.pytest_counts("7 passed, 2 deselected in 30.0s"),
        ),
        gpu_check.Step("forward vit_s eager masked=off", "forward", [], 1, status="skipped (budget)"),
        gpu_check.Step(
            "memory plan vs measured vit_l 640 checkpointing=none",
            "plan_check",
            [],
            1,
            status="ok",
            seconds=40,
            result={
                "micro_batch": 4,
                "checkpointing": "none",
                "estimate_gib": 18.0,
                "measured_gib": 20.0,
                "ratio": 0.9,
            },
        ),
    ]
    from dataclasses import asdict

    return {
        "device": "NVIDIA H100",
        "torch": "2.9",
        "cuda": "12.8",
        "seconds": 480,
        "steps": [asdict(s) for s in steps],
    }


def test_summary_tables_come_from_the_results():
    report = _report()
    assert report["steps"][5]["result"] == {"passed": 7, "deselected": 2}
    md = gpu_check.summary_markdown(report)
    assert md.startswith("# GPU check: NVIDIA H100")
    assert "| vit_l | 640x640 | default | off | 150.0 | 721.4 | 1.50 |" in md
    assert "ViT-L best: 150.0 images/s, 0.75x the goal of 200." in md
    assert "| compiled | annealing | 4 | 14.00 | 1.40x | 25.00 | 61.5 | 9 | 4 | 0 |" in md
    assert "PQ 41.25, trained and evaluated in 100 s" in md
    assert "7 passed, 2 deselected" in md
    assert "| forward vit_l default masked=on | timeout | 180 | over 180 s |" in md
    assert "| forward vit_s eager masked=off | skipped (budget) | 0 |  |" in md
    assert "estimate 18.00 GiB, measured 20.00 GiB (estimate / measured 0.90)" in md
