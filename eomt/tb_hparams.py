"""Hyper-parameters and final metrics in TensorBoard's HParams plugin, one row per run.

Each run writes into its own event directory (no timestamped sub-run, unlike
`SummaryWriter.add_hparams`), so `tensorboard --logdir outputs/multirun/<sweep>` lists every run of
the sweep once in the HPARAMS tab, side by side with its training curves. The columns are the config
keys the sweep varies (`sweep_hparams`): a sweep over a config group (`+sweep/annealing=...`) shows the
keys its options change (`schedule.annealing`, `model.masked_attn`, `eval.masked_attn`), not only the
option's name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
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


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def group_columns(
    cfg: DictConfig, overrides: Sequence[str], group: str, options: Sequence[str], config_name: str
) -> dict[str, HParamValue]:
    """The keys in which the configs of a group's `options` differ, with this job's (`cfg`) values.

    Composes the job's config once per option (`overrides` with that group's entry swapped)."""
    others = [o for o in overrides if o.partition("=")[0].lstrip("+~") != group]
    prefix = "+" if any(o.partition("=")[0] == f"+{group}" for o in overrides) else ""
    flats = [
        _flat(
            OmegaConf.to_container(
                compose(config_name, [*others, f"{prefix}{group}={option}"]), resolve=False
            )
        )
        for option in options
    ]
    keys = sorted({k for flat in flats for k in flat if len({repr(f.get(k, "<absent>")) for f in flats}) > 1})
    return {key: _plain(OmegaConf.select(cfg, key, default=None)) for key in keys}


def sweep_hparams(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, HParamValue]:
    """This job's HParams columns: what its sweep varies, with this job's values.

    In a multirun: each key the sweep sweeps over (`hydra.sweeper.params` and the command line's value
    lists, as the sweep's multirun.yaml records them), and for a swept config group also the keys its
    options change. Overrides every job shares are left out: they would crowd the table. In a single
    run, or outside a Hydra app, every override (`hparams_from_overrides`)."""
    given = hparams_from_overrides(overrides)
    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return flatten_hparams(given)
    hydra_cfg = HydraConfig.get()
    loader = GlobalHydra.instance().config_loader()
    parser = OverridesParser.create(config_loader=loader)
    sweeps = [
        parser.parse_override(f"{k}={v}")
        for k, v in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items()
    ]
    multirun = Path(str(OmegaConf.select(hydra_cfg, "sweep.dir"))) / "multirun.yaml"
    if OmegaConf.select(hydra_cfg, "mode") == RunMode.MULTIRUN and multirun.is_file():
        command_line = OmegaConf.load(multirun).hydra.overrides.task
        sweeps += [o for o in parser.parse_overrides(list(command_line)) if o.is_sweep_override()]
        out = {o.key_or_group: given[o.key_or_group] for o in sweeps if o.key_or_group in given}
    else:
        out = dict(given)
    for override in sweeps:
        group = override.key_or_group
        if loader.get_group_options(group) and override.is_discrete_sweep():  # a group: the keys it changes
            options = list(override.sweep_string_iterator())
            out.update(group_columns(cfg, overrides, group, options, hydra_cfg.job.config_name))
    return flatten_hparams(out)


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
    # torch's hparams() stores a bool as a number (1.0000 in the table): write true / false instead
    columns = {k: str(v).lower() if isinstance(v, bool) else v for k, v in flatten_hparams(hparams).items()}
    experiment, session_start, session_end = hparams_summary(columns, values)
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary, step)
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
