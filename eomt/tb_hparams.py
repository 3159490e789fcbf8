"""Hyper-parameters and final metrics in TensorBoard's HParams plugin, one row per run.

Each run writes into its own event directory (no timestamped sub-run, unlike
`SummaryWriter.add_hparams`), so `tensorboard --logdir outputs/multirun/<sweep>` lists every run of
the sweep once in the HPARAMS tab, side by side with its training curves.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

HParamValue = bool | int | float | str


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, HParamValue]:
    """Nested dicts -> dotted keys; values the plugin cannot show (None, lists, ...) become strings."""
    flat: dict[str, HParamValue] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            flat[name] = value.item()  # a 0-d tensor / numpy scalar
        else:
            flat[name] = str(value)
    return flat


def hparams_from_overrides(overrides: Iterable[str]) -> dict[str, HParamValue]:
    """Hydra override strings ("model.num_blocks=2", "+sweep=annealing") -> {key: value}.

    In a sweep these are exactly what differs between runs (pass
    `HydraConfig.get().overrides.task`); numbers and booleans keep their type.
    """
    out: dict[str, HParamValue] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            continue
        out[key.lstrip("+~")] = _parse_scalar(value)
    return out


def _parse_scalar(text: str) -> HParamValue:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def log_hparams(
    writer_or_logdir: SummaryWriter | str | Path,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, Any],
    step: int = 0,
) -> None:
    """Record `hparams` (nested dicts allowed) and final `metrics` for this run's HParams row.

    `writer_or_logdir`: the run's SummaryWriter or its event directory. Each metric is also written
    as a scalar with that tag at `step` (the plugin reads a metric's value from the scalar of the
    same tag). Metrics that are missing or not finite numbers are left out.
    """
    logdir = (
        writer_or_logdir.get_logdir() if isinstance(writer_or_logdir, SummaryWriter) else writer_or_logdir
    )
    if isinstance(writer_or_logdir, SummaryWriter):
        writer_or_logdir.flush()
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real) and math.isfinite(v)}
    experiment, session_start, session_end = hparams_summary(flatten_hparams(hparams), values)
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary, step)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
