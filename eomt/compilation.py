"""torch.compile for training and inference, and what Dynamo did over a run.

Training compiles by region (`EoMT.compile_regions`: every block as one shared graph, plus the embedding,
the heads and the attention mask), so that graphs and compile time do not grow with depth and no host
decision of the annealing becomes a guard. Inference with masked attention off has no host decisions at
all: the whole network compiles as one graph at a fixed size.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Dynamo keeps the records of the last 64 frame compilations by default; from a CompileStats' making on,
# all are kept, so that its summary counts every recompilation.
_METRICS_KEPT = 100_000


def compile_for_training(model: nn.Module, **options: Any) -> None:
    """Compile `model` in place: EoMT by region; other networks (the Mask2Former baselines) whole."""
    if hasattr(model, "compile_regions"):
        model.compile_regions(**options)
    else:
        model.compile(**options)


def compile_for_inference(model: nn.Module, **options: Any) -> nn.Module:
    """The network to call for inference at the model's input size: EoMT without masked attention compiled
    whole (`fullgraph=True`); with masked attention (`eval.masked_attn=true`), a copy compiled by region as
    in training. `model` itself is left as it is. A second batch size (the last batch, sliding windows)
    recompiles once with a dynamic batch dimension."""
    if getattr(model, "masked_attn", False) and hasattr(model, "compile_regions"):
        regional = copy.deepcopy(model)
        regional.compile_regions(**options)
        return regional
    fullgraph = hasattr(model, "compile_regions")  # EoMT; the baselines' decoders break graphs
    return torch.compile(model, fullgraph=fullgraph, **options)


@dataclass
class CompileSummary:
    """What Dynamo compiled since `CompileStats` was made."""

    frames: int = 0  # frame compilations (first compilations and recompilations)
    recompiles: int = 0  # compilations of a function that already had a graph
    graphs: int = 0  # graphs captured
    graph_breaks: int = 0
    seconds: float = 0.0  # Dynamo + AOT + Inductor time, as Dynamo records it
    per_function: Counter = field(default_factory=Counter)  # "name (file:line)" -> compilations
    at_limit: list[str] = field(default_factory=list)  # functions that reached the recompile limit
    recompile_limit: int = 0  # Dynamo's (read here: train.py's __main__ must not name torch._dynamo.config,
    # which cloudpickle cannot pickle when a sweep launcher ships the task function by value)

    def line(self) -> str:
        return (
            f"torch.compile: {self.graphs} graphs from {self.frames} compilations "
            f"({self.recompiles} recompilations, {self.graph_breaks} graph breaks), {self.seconds:.1f} s compiling"
        )


class CompileStats:
    """Reads Dynamo's records (compilations, recompilations, graphs, time) relative to when it was made."""

    def __init__(self) -> None:
        torch._dynamo.utils.set_compilation_metrics_limit(_METRICS_KEPT)
        self._start_records = len(torch._dynamo.utils.get_compilation_metrics())
        self._start_graphs = _counter("stats", "unique_graphs")
        self._start_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())

    def summary(self) -> CompileSummary:
        records = torch._dynamo.utils.get_compilation_metrics()[self._start_records :]
        out = CompileSummary(
            frames=sum(r.co_name is not None for r in records),
            graphs=_counter("stats", "unique_graphs") - self._start_graphs,
            graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()) - self._start_breaks,
        )
        limit = torch._dynamo.config.recompile_limit
        out.recompile_limit = limit
        for record in records:
            out.seconds += record.entire_frame_compile_time_s or 0.0
            if record.co_name is None:  # the backward graph of a frame, compiled at its first backward
                continue
            name = f"{record.co_name} ({record.co_filename}:{record.co_firstlineno})"
            out.per_function[name] += 1
            if _is_recompile(record.compile_id):
                out.recompiles += 1
            if "recompile limit" in (record.fail_reason or "") or "recompile_limit" in (
                record.fail_type or ""
            ):
                out.at_limit.append(name)
        out.at_limit += [
            n for n, count in out.per_function.items() if count >= limit and n not in out.at_limit
        ]
        return out


def _counter(group: str, name: str) -> int:
    return int(torch._dynamo.utils.counters[group][name])


def _is_recompile(compile_id: Any) -> bool:
    """Dynamo's compile ids read "frame/attempt" (with an optional "[...]" prefix); attempt > 0 recompiles."""
    attempt = str(compile_id).rsplit("/", 1)[-1].split("_")[0]
    return attempt.isdigit() and int(attempt) > 0
