"""Compare the runs of a sweep: a markdown table of runs x metrics and an accuracy-vs-FPS plot.

    python -m eomt.report outputs/multirun/annealing_coco_panoptic_vit_l

Reads every `metrics.json` under the sweep directory (one per run directory, written when a run
is evaluated), expected to look like
`{"task": "panoptic", "metrics": {"PQ": 56.0, ...}, "fps": 128.0, "gflops": 830.0, "params": 3.2e8}`.
Missing entries show as "-"; a record without a "metrics" object has its metrics at the top level.
A `benchmark.json` next to it (written by a speed benchmark, so that re-evaluating does not erase
the timings) supplies or replaces fps / gflops / params.
The plot (PNG, drawn with PIL) puts each run's main metric (PQ / mIoU / AP) against its FPS, like
the paper's speed/accuracy figure.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from eomt.errors import DataError, user_errors

METRICS_FILE = "metrics.json"
BENCHMARK_FILE = "benchmark.json"  # optional, from a speed benchmark: {"fps": .., "gflops": .., "params": ..}
PRIMARY_METRIC = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}
_COST_KEYS = ("fps", "gflops", "params")
_NOT_METRICS = {*_COST_KEYS, "step", "epoch"}
_SKIP_DIRS = {".submitit", "tb", "checkpoints", ".hydra"}


@dataclass
class RunResult:
    name: str  # the run directory relative to the sweep directory
    task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fps: float | None = None
    gflops: float | None = None
    params: float | None = None

    @property
    def primary_metric(self) -> str | None:
        """PQ / mIoU / AP by task; without a task, the first of those the run has."""
        if self.task in PRIMARY_METRIC and PRIMARY_METRIC[self.task] in self.metrics:
            return PRIMARY_METRIC[self.task]
        return next((m for m in PRIMARY_METRIC.values() if m in self.metrics), None)


def _number(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _numeric_items(mapping: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_numeric_items(value, prefix=f"{prefix}{key}/"))
        elif (number := _number(value)) is not None:
            out[f"{prefix}{key}"] = number
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run what wrote it") from err
    if not isinstance(data, dict):
        raise DataError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def load_run(path: Path, name: str) -> RunResult:
    """One run from its metrics.json, with FPS / GFLOPs / params from a benchmark.json beside it if any."""
    data = _read_json(path)
    benchmark = path.with_name(BENCHMARK_FILE)
    if benchmark.is_file():
        measured = _read_json(benchmark)
        data.update({k: measured[k] for k in _COST_KEYS if _number(measured.get(k)) is not None})
    if isinstance(data.get("metrics"), dict):
        metrics = _numeric_items(data["metrics"])
    else:  # a flat record: every top-level number that is not a cost or a position in training
        metrics = {k: v for k, v in _numeric_items(data).items() if "/" not in k and k not in _NOT_METRICS}
    task = data.get("task")
    return RunResult(
        name=name,
        task=task if isinstance(task, str) else None,
        metrics=metrics,
        **{key: _number(data.get(key)) for key in _COST_KEYS},
    )


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_runs(sweep_dir: str | Path) -> list[RunResult]:
    """Every run under `sweep_dir` that wrote a metrics.json, in job-number order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise DataError(f"sweep directory {root} does not exist; pass e.g. outputs/multirun/<sweep>")
    runs = []
    for path in root.rglob(METRICS_FILE):
        relative = path.parent.relative_to(root)
        if _SKIP_DIRS.intersection(relative.parts):
            continue
        runs.append(load_run(path, relative.as_posix()))
    return sorted(runs, key=lambda r: _natural_key(r.name))


def metric_columns(runs: Sequence[RunResult]) -> list[str]:
    """All metric names, the main ones (PQ, mIoU, AP) first."""
    names = {m for r in runs for m in r.metrics}
    primary = [m for m in PRIMARY_METRIC.values() if m in names]
    return primary + sorted(names - set(primary), key=_natural_key)


def _fmt(value: float | None, kind: str = "metric") -> str:
    if value is None:
        return "-"
    if kind == "params":
        return f"{value / 1e6:.1f}M" if value >= 1e5 else f"{value:.0f}"
    if kind in ("fps", "gflops"):
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def markdown_table(runs: Sequence[RunResult], metrics: Sequence[str] | None = None) -> str:
    """A markdown table: one row per run; columns task, metrics, FPS, GFLOPs, params."""
    columns = list(metrics) if metrics is not None else metric_columns(runs)
    header = ["run", "task", *columns, "FPS", "GFLOPs", "params"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for r in runs:
        cells = [r.name, r.task or "-", *(_fmt(r.metrics.get(m)) for m in columns)]
        cells += [_fmt(r.fps, "fps"), _fmt(r.gflops, "gflops"), _fmt(r.params, "params")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the plot ---------------------------------------------------------------------------------
_SIZE = (960, 640)
_MARGIN = {"left": 90, "right": 40, "top": 60, "bottom": 80}
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    if high <= low:
        low, high = low - 1.0, high + 1.0
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    tick = first
    while tick <= high + step * 1e-9:
        ticks.append(round(tick, 10))
        tick += step
    if ticks[-1] < high:
        ticks.append(round(tick, 10))
    return ticks


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _tick_label(value: float) -> str:
    return f"{value:g}"


def plot_accuracy_vs_fps(
    runs: Sequence[RunResult], path: str | Path, title: str = ""
) -> tuple[Path, str] | None:
    """Scatter the main metric against FPS, one labelled point per run; None when no run has both.

    Runs are plotted on the metric most of them report (PQ, mIoU or AP); returns (png path, metric).
    """
    counts = Counter(r.primary_metric for r in runs if r.fps is not None and r.primary_metric)
    if not counts:
        return None
    metric = counts.most_common(1)[0][0]
    points = [(r.fps, r.metrics[metric], r.name) for r in runs if r.fps is not None and metric in r.metrics]
    xs = _nice_ticks(min(0.0, min(p[0] for p in points)), max(p[0] for p in points) * 1.05)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    pad = 0.05 * (y_high - y_low) or 0.5
    ys = _nice_ticks(y_low - pad, y_high + pad)

    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, normal = _font(13), _font(16)
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = _SIZE[0] - _MARGIN["right"], _SIZE[1] - _MARGIN["bottom"]

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - xs[0]) / (xs[-1] - xs[0]) * (right - left)
        py = bottom - (y - ys[0]) / (ys[-1] - ys[0]) * (bottom - top)
        return px, py

    for x in xs:
        px, _ = to_px(x, ys[0])
        draw.line([(px, top), (px, bottom)], fill="#e6e6e6")
        draw.text((px, bottom + 8), _tick_label(x), fill="black", font=small, anchor="mt")
    for y in ys:
        _, py = to_px(xs[0], y)
        draw.line([(left, py), (right, py)], fill="#e6e6e6")
        draw.text((left - 8, py), _tick_label(y), fill="black", font=small, anchor="rm")
    draw.rectangle([(left, top), (right, bottom)], outline="black")
    draw.text(((left + right) / 2, _SIZE[1] - 20), "FPS", fill="black", font=normal, anchor="ms")
    ylabel = Image.new("RGB", (200, 24), "white")
    ImageDraw.Draw(ylabel).text((100, 12), metric, fill="black", font=normal, anchor="mm")
    image.paste(ylabel.rotate(90, expand=True), (8, (top + bottom) // 2 - 100))
    draw.text(((left + right) / 2, 24), title or f"{metric} vs FPS", fill="black", font=normal, anchor="mm")

    for i, (x, y, name) in enumerate(points):
        px, py = to_px(x, y)
        colour = _COLOURS[i % len(_COLOURS)]
        draw.ellipse([(px - 5, py - 5), (px + 5, py + 5)], fill=colour, outline="black")
        label = name if len(name) <= 48 else name[:45] + "..."
        anchor = "rb" if px > (left + right) / 2 else "lb"
        draw.text((px + (-8 if anchor == "rb" else 8), py - 6), label, fill=colour, font=small, anchor=anchor)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out, metric


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eomt.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/multirun/<sweep>")
    parser.add_argument("--metrics", help="comma-separated metric columns (default: all, PQ/mIoU/AP first)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: <sweep_dir>/accuracy_vs_fps.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    runs = find_runs(args.sweep_dir)
    if not runs:
        raise DataError(f"no {METRICS_FILE} under {args.sweep_dir}; runs write it when they are evaluated")
    columns = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    print(markdown_table(runs, columns))
    if not args.no_plot:
        plotted = plot_accuracy_vs_fps(
            runs, args.plot or args.sweep_dir / "accuracy_vs_fps.png", title=args.sweep_dir.resolve().name
        )
        if plotted is None:
            print("\nno run reports both FPS and PQ/mIoU/AP: no plot", file=sys.stderr)
        else:
            print(f"\n{plotted[1]} vs FPS: {plotted[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
