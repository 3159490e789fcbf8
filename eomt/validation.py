"""Evaluation of a model on the configured validation split, as train.py and evaluate.py run it.

Builds the split, the task's predictor and evaluator once; each `run` scores the model, writes
`metrics.json` into the run directory (atomically, rank 0), logs the headline numbers and a few
[prediction | ground truth] overlays to TensorBoard, and leaves the caller's RNG streams as
they were (so evaluating during training does not change the training run).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from eomt import distributed
from eomt.atomic import write_json
from eomt.data import build_dataset
from eomt.data.collate import collate_eval
from eomt.evaluation import Callback, ShardSampler, build_evaluation, evaluate
from eomt.metrics.report import format_table, scalar_metrics
from eomt.profiling import count_params, gflops_per_image, images_per_second
from eomt.run_setup import AMP_DTYPES
from eomt.visualize import OverlayCollector

log = logging.getLogger("eomt.validation")
METRICS_FILE = "metrics.json"


@contextmanager
def masked_attention(model: nn.Module, enabled: bool):
    """Run with masked attention on or off (models without it are left alone)."""
    if not hasattr(model, "masked_attn"):
        yield
        return
    previous = model.masked_attn
    model.masked_attn = enabled
    try:
        yield
    finally:
        model.masked_attn = previous


class Validator:
    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg = cfg
        self.task = cfg.task.name
        self.device = device
        self.dataset = build_dataset(cfg.dataset, self.task, "val", train=False)
        self.predictor, self.evaluator = build_evaluation(cfg.eval, self.task)
        # the network's input is resized in the workers (PIL, as the release), not on the accelerator
        prepare = partial(self.predictor.prepare, crop=tuple(cfg.model.img_size))
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.eval.batch_size,
            sampler=ShardSampler(len(self.dataset)),
            collate_fn=partial(collate_eval, prepare=prepare),
            num_workers=cfg.eval.num_workers,
        )

    def run(
        self,
        model: nn.Module,
        *,
        step: int | None = None,
        writer: SummaryWriter | None = None,
        run_dir: Path | None = None,
        callbacks: Sequence[Callback] = (),
        benchmark: bool = False,
    ) -> dict[str, Any]:
        """Score `model`; with `benchmark`, also time its forward pass for metrics.json (fps, gflops)."""
        overlays = OverlayCollector(self.task, self.cfg.dataset.class_names, self.cfg.eval.num_overlays)
        masked = bool(self.cfg.eval.masked_attn or self.cfg.eval.per_block)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with masked_attention(model, masked):
                metrics = evaluate(
                    model,
                    self.loader,
                    self.predictor,
                    self.evaluator,
                    per_block=self.cfg.eval.per_block,
                    callbacks=[overlays, *callbacks],
                    description=f"eval {self.cfg.dataset.name} {self.task}",
                )
        headline = scalar_metrics(metrics)
        self.record = {}
        if distributed.is_main():
            log.info("%s\n%s", f"step {step}" if step is not None else "evaluation", format_table(metrics))
            if run_dir is not None:
                self.record = {
                    "task": self.task,
                    "dataset": self.cfg.dataset.name,
                    "step": step,
                    "metrics": headline,
                    "params": count_params(model),
                    "details": _plain(metrics),
                }
                if benchmark:
                    self.record.update(self.forward_cost(model, masked))
                write_json(Path(run_dir) / METRICS_FILE, self.record, indent=2)
            if writer is not None:
                for name, value in headline.items():
                    writer.add_scalar(f"val/{name}", value, step)
                for i, (image_id, image) in enumerate(overlays.overlays):
                    writer.add_image(f"val/overlay{i}_{image_id}", torch.as_tensor(image), step)
        self.overlays = overlays.overlays
        return metrics

    def forward_cost(self, model: nn.Module, masked: bool) -> dict[str, float]:
        """GFLOPs and images/s of the network alone at batch 1 and the crop size, as the paper reports."""
        images = torch.rand(1, 3, *model.img_size, device=self.device)
        amp = AMP_DTYPES[self.cfg.eval.precision] if self.device.type == "cuda" else None
        was_training = model.training
        model.eval()
        try:
            with (
                masked_attention(model, masked),
                torch.autocast(self.device.type, dtype=amp, enabled=amp is not None),
            ):
                gflops = gflops_per_image(model, images)
                iters = 50 if self.device.type == "cuda" else 3
                fps = images_per_second(model, images, iters=iters, warmup=min(iters, 10))
        finally:
            model.train(was_training)
        return {"gflops": gflops, "fps": fps, "fps_device": _device_name(self.device)}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _plain(obj: Any) -> Any:
    """JSON-ready copy: dict keys as strings, tensors and numpy scalars as numbers."""
    if isinstance(obj, dict | DictConfig):
        obj = OmegaConf.to_container(obj) if isinstance(obj, DictConfig) else obj
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj
