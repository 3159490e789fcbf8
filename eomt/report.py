"""Compare the runs of a sweep: a markdown table of runs x metrics and an accuracy-vs-FPS plot.

    python -m eomt.report outputs/multirun/annealing_coco_panoptic_vit_l

Reads every `metrics.json` under the sweep directory (one per run directory, written when a run
is evaluated), expected to look like
`{"task": "panoptic", "metrics": {"PQ": 56.0, ...}, "fps": 128.0, "gflops": 830.0, "params": 3.2e8}`.
Missing entries show as "-"; a record without a "metrics" object has its metrics at the top level.
A `benchmark.json` next to it (written by a speed benchmark, so that re-evaluating does not erase
the timings) supplies or replaces fps / gflops / params.
Every number is printed with two decimals. An FPS measured while other processes kept the run's CPUs
busy (`fps_under_load`, see eomt.profiling.LoadMeter) is marked `*` in the table and left out of the
plot, as are FPS measured on another device than most runs': only comparable speeds are plotted.
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
_NOT_METRICS = {*_COST_KEYS, "step", "epoch", "fps_other_load", "fps_idle"}  # fps_*: how FPS was timed
_SKIP_DIRS = {".submitit", "tb", "checkpoints", ".hydra"}


@dataclass
class RunResult:
    name: str  # the run directory relative to the sweep directory
    task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    fps: float | None = None
    gflops: float | None = None
    params: float | None = None
    fps_device: str | None = None  # where the FPS was measured ("cpu", the GPU's name)
    fps_under_load: bool = False  # other processes kept the CPUs busy while it was timed

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
    device = data.get("fps_device")
    return RunResult(
        name=name,
        task=task if isinstance(task, str) else None,
        metrics=metrics,
        **{key: _number(data.get(key)) for key in _COST_KEYS},
        fps_device=device if isinstance(device, str) else None,
        fps_under_load=data.get("fps_under_load") is True,
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


def format_number(value: float | None, kind: str = "metric") -> str:
    """Two decimals for every number (60.57, 0.01), params in millions; "-" for a missing one."""
    if value is None:
        return "-"
    if kind == "params" and value >= 1e5:
        return f"{value / 1e6:.2f}M"
    return f"{value + 0.0:.2f}" if round(value, 2) else "0.00"  # never "-0.00"


UNDER_LOAD_NOTE = "* FPS measured while other processes kept the CPUs busy: not comparable, not plotted"


def markdown_table(runs: Sequence[RunResult], metrics: Sequence[str] | None = None) -> str:
    """A markdown table: one row per run; columns task, metrics, FPS, GFLOPs, params.

    An FPS measured under load is marked "*", with a note under the table."""
    columns = list(metrics) if metrics is not None else metric_columns(runs)
    header = ["run", "task", *columns, "FPS", "GFLOPs", "params"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for r in runs:
        cells = [r.name, r.task or "-", *(format_number(r.metrics.get(m)) for m in columns)]
        fps = format_number(r.fps, "fps") + (" *" if r.fps is not None and r.fps_under_load else "")
        cells += [fps, format_number(r.gflops, "gflops"), format_number(r.params, "params")]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.fps is not None and r.fps_under_load for r in runs):
        lines += ["", UNDER_LOAD_NOTE]
    return "\n".join(lines)


def comparable_speeds(runs: Sequence[RunResult]) -> tuple[list[RunResult], list[tuple[RunResult, str]]]:
    """(runs whose FPS can be compared, [(run, why not)] for the other runs with an FPS).

    Comparable: measured alone, on the device most of those runs were measured on."""
    timed = [r for r in runs if r.fps is not None]
    alone = [r for r in timed if not r.fps_under_load]
    devices = Counter(r.fps_device for r in alone)
    device = devices.most_common(1)[0][0] if devices else None
    left_out = [(r, "measured under load") for r in timed if r.fps_under_load]
    left_out += [
        (r, f"measured on {r.fps_device or 'an unknown device'}") for r in alone if r.fps_device != device
    ]
    return [r for r in alone if r.fps_device == device], sorted(
        left_out, key=lambda x: _natural_key(x[0].name)
    )


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
    return f"{value + 0.0:g}"  # + 0.0: -0.0 reads "0", not "-0"


Box = tuple[float, float, float, float]  # left, top, right, bottom


def _overlap(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def place_labels(
    points: Sequence[tuple[float, float]],
    sizes: Sequence[tuple[float, float]],
    bounds: Box,
    radius: float = 6,
) -> list[Box]:
    """A box for each point's label (width, height), beside its point, overlapping no other label or point.

    Tries positions around the point, then ever further above and below it; where none is free (more
    labels than room), the least covered one. Every box stays inside `bounds`."""
    markers = [(x - radius, y - radius, x + radius, y + radius) for x, y in points]
    placed: list[Box] = []
    for (x, y), (w, h) in zip(points, sizes, strict=True):
        gap = radius + 3
        candidates = [
            (x + gap, y - h / 2),  # right
            (x - gap - w, y - h / 2),  # left
            (x - w / 2, y - gap - h),  # above
            (x - w / 2, y + gap),  # below
            (x + gap, y - gap - h),  # upper right, ...
            (x - gap - w, y - gap - h),
            (x + gap, y + gap),
            (x - gap - w, y + gap),
        ]
        for k in range(1, 12):  # further out, alternately above and below
            for sign in (-1, 1):
                offset = sign * k * (h + 2)
                candidates += [(x + gap, y - h / 2 + offset), (x - gap - w, y - h / 2 + offset)]
        best, best_cover = None, math.inf
        for left, top in candidates:
            left = min(max(left, bounds[0]), bounds[2] - w)
            top = min(max(top, bounds[1]), bounds[3] - h)
            box = (left, top, left + w, top + h)
            cover = sum(_overlap(box, other) for other in placed + markers)
            if cover < best_cover:
                best, best_cover = box, cover
            if cover == 0:
                break
        placed.append(best)
    return placed


def plot_accuracy_vs_fps(
    runs: Sequence[RunResult], path: str | Path, title: str = ""
) -> tuple[Path, str] | None:
    """Scatter the main metric against FPS, one labelled point per run; None when no run has both.

    Only comparable speeds are plotted (`comparable_speeds`). Runs are plotted on the metric most of
    them report (PQ, mIoU or AP); returns (png path, metric).
    """
    runs, _ = comparable_speeds(runs)
    counts = Counter(r.primary_metric for r in runs if r.primary_metric)
    if not counts:
        return None
    metric = counts.most_common(1)[0][0]
    points = [(r.fps, r.metrics[metric], r.name) for r in runs if metric in r.metrics]
    xs = _nice_ticks(min(0.0, min(p[0] for p in points)), max(p[0] for p in points) * 1.05)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    pad = 0.05 * (y_high - y_low) or 0.5
    floor = max(0.0, y_low - pad) if y_low >= 0 else y_low - pad  # a score >= 0 gets no negative axis
    ys = _nice_ticks(floor, y_high + pad)

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

    centres = [to_px(x, y) for x, y, _ in points]
    labels = [name if len(name) <= 48 else name[:45] + "..." for _, _, name in points]
    sizes = []
    for label in labels:
        box = draw.textbbox((0, 0), label, font=small, anchor="lt")
        sizes.append((box[2] - box[0], box[3] - box[1]))
    boxes = place_labels(centres, sizes, (left + 2, top + 2, right - 2, bottom - 2))
    for i, ((px, py), label, box) in enumerate(zip(centres, labels, boxes, strict=True)):
        colour = _COLOURS[i % len(_COLOURS)]
        near = (min(max(px, box[0]), box[2]), min(max(py, box[1]), box[3]))  # the box's point nearest the dot
        if math.dist(near, (px, py)) > 12:  # a label moved away from its point gets a leader line
            draw.line([(px, py), near], fill=colour)
        draw.ellipse([(px - 5, py - 5), (px + 5, py + 5)], fill=colour, outline="black")
        draw.text((box[0], box[1]), label, fill=colour, font=small, anchor="lt")

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out, metric


def summarize(
    sweep_dir: str | Path, metrics: Sequence[str] | None = None, plot: str | Path | None | bool = True
) -> tuple[str, list[str]]:
    """(the markdown table, notes on the plot) of a sweep; `plot`: a PNG path, True (the sweep's
    accuracy_vs_fps.png) or False (none)."""
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if not runs:
        raise DataError(f"no {METRICS_FILE} under {sweep_dir}; runs write it when they are evaluated")
    notes = []
    if plot is not False:
        path = sweep_dir / "accuracy_vs_fps.png" if plot is True or plot is None else Path(plot)
        plotted = plot_accuracy_vs_fps(runs, path, title=sweep_dir.resolve().name)
        _, left_out = comparable_speeds(runs)
        if plotted is not None:
            notes.append(f"{plotted[1]} vs FPS: {plotted[0]}")
        elif any(r.fps is not None for r in runs):
            notes.append("no FPS comparable with another: no plot")
        else:
            notes.append("no run reports both FPS and PQ/mIoU/AP: no plot")
        notes += [f"not plotted: {r.name} (FPS {why})" for r, why in left_out]
    return markdown_table(runs, metrics), notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eomt.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/multirun/<sweep>")
    parser.add_argument("--metrics", help="comma-separated metric columns (default: all, PQ/mIoU/AP first)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: <sweep_dir>/accuracy_vs_fps.png)")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    columns = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    table, notes = summarize(args.sweep_dir, columns, plot=False if args.no_plot else (args.plot or True))
    print(table)
    if notes:
        print("\n" + "\n".join(notes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
