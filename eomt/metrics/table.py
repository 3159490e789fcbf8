"""Present evaluator results: headline scalars (percent) for logs/TensorBoard and a printed table.

`scalar_metrics` names the headline numbers as papers do (PQ, mIoU, AP: the names eomt.report
reads from metrics.json); `format_table` prints them. Both recognise the task from the result's
layout: panoptic results have "All", semantic "miou", instance "AP".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def _panoptic_scalars(m: dict) -> dict[str, float]:
    out = {}
    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for key in ("pq", "sq", "rq"):
            out[f"{key.upper()}{suffix}"] = 100 * m[group][key]
    return out


def _semantic_scalars(m: dict) -> dict[str, float]:
    return {
        "mIoU": 100 * m["miou"],
        "pixel_accuracy": 100 * m["pixel_accuracy"],
        "mean_accuracy": 100 * m["mean_accuracy"],
    }


def _instance_scalars(m: dict) -> dict[str, float]:
    out = {key: 100 * m[key] for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    if "cityscapes" in m:
        out["cityscapes_AP"] = 100 * m["cityscapes"]["AP"]
        out["cityscapes_AP50"] = 100 * m["cityscapes"]["AP50"]
    return out


# marker key of the result layout -> its headline scalars
_SCALARS: dict[str, Callable[[dict], dict[str, float]]] = {
    "All": _panoptic_scalars,
    "miou": _semantic_scalars,
    "AP": _instance_scalars,
}


def _scalars_of(metrics: dict) -> dict[str, float]:
    for marker, scalars in _SCALARS.items():
        if marker in metrics:
            return scalars(metrics)
    raise ValueError(
        f"unrecognised metrics (keys {sorted(map(str, metrics))[:6]}): pass an evaluator's compute() result"
    )


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat {name: value in percent}; per-block results as "block<i>/<name>"."""
    out = _scalars_of(metrics)
    for block, block_metrics in metrics.get("per_block", {}).items():
        out |= {f"block{block}/{name}": value for name, value in _scalars_of(block_metrics).items()}
    return out


def _fmt(value: float) -> str:
    return "    -" if math.isnan(value) else f"{value:5.1f}"


def _panoptic_table(m: dict) -> list[str]:
    lines = [f"{'':10s}|    PQ     SQ     RQ     N", "-" * 38]
    for group in ("All", "Things", "Stuff"):
        r = m[group]
        lines.append(
            f"{group:10s}| {_fmt(100 * r['pq'])}  {_fmt(100 * r['sq'])}  {_fmt(100 * r['rq'])}  {r['n']:4d}"
        )
    return lines


def _semantic_table(m: dict) -> list[str]:
    return [
        f"mIoU {_fmt(100 * m['miou'])}  |  pixel acc {_fmt(100 * m['pixel_accuracy'])}  |  "
        f"mean acc {_fmt(100 * m['mean_accuracy'])}  |  {m['num_classes_counted']} classes counted"
    ]


def _instance_table(m: dict) -> list[str]:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = ["   ".join(f"{k:>5s}" for k in keys), "   ".join(_fmt(100 * m[k]) for k in keys)]
    if "cityscapes" in m:
        c = m["cityscapes"]
        lines.append(f"Cityscapes convention: AP {_fmt(100 * c['AP'])}  AP50 {_fmt(100 * c['AP50'])}")
    return lines


_TABLES: dict[str, Callable[[dict], list[str]]] = {
    "All": _panoptic_table,
    "miou": _semantic_table,
    "AP": _instance_table,
}


def format_table(metrics: dict[str, Any]) -> str:
    """The result as a small text table (percent), per-block headline numbers below it."""
    marker = next((k for k in _TABLES if k in metrics), None)
    if marker is None:
        raise ValueError(
            f"unrecognised metrics (keys {sorted(map(str, metrics))[:6]}): pass an evaluator's compute() result"
        )
    lines = _TABLES[marker](metrics)
    if "num_images" in metrics:
        lines.append(f"({metrics['num_images']} images)")
    for block, block_metrics in metrics.get("per_block", {}).items():
        headline = next(iter(_scalars_of(block_metrics).items()))
        lines.append(f"before query block {block}: {headline[0]} {_fmt(headline[1])}")
    return "\n".join(lines)
