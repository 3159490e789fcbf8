"""Evaluation: a model on the validation split, as train.py and evaluate.py run it.

    evaluation = Evaluation.from_config(cfg, device)      # or Evaluation(dataset=..., ...)
    result = evaluation.run(model, step=step, writer=writer, run_dir=run_dir)
    result.metrics, result.record, result.overlays

`evaluate(model, loader, predictor, evaluator)` is the loop underneath: every rank runs its share
of the images (`ShardSampler`) and gets the metrics of all of them. Callbacks see each batch's final
predictions with their samples (overlays, file writers). With `pipeline` (the default) the
forward pass and post-processing stay on the loop's thread and device, while the CPU work on
finished predictions (their copy to the host, RLE encoding, PQ / IoU accumulation, callbacks) runs
in one background thread, batch after batch in order: the next forward overlaps it and the results
are those of the inline loop. `Evaluation.run` also writes
`metrics.json` (rank 0, atomically), logs the headline numbers and overlays to TensorBoard and
leaves the caller's RNG streams as they were, so evaluating during training does not change it.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eomt import distributed
from eomt.atomic import write_json
from eomt.compilation import compile_for_inference
from eomt.data import build_dataset
from eomt.data.collate import collate_eval
from eomt.device import inference_autocast
from eomt.errors import ConfigError
from eomt.inference.predictor import Predictor
from eomt.metrics.table import format_table, scalar_metrics
from eomt.profiling import LoadMeter, count_params, gflops_per_image, images_per_second
from eomt.visualize import OverlayCollector

log = logging.getLogger("eomt.evaluation")
METRICS_FILE = "metrics.json"

Callback = Callable[[Sequence[dict], Sequence[dict]], None]


class Evaluator(Protocol):
    def reset(self) -> None: ...
    def update(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None: ...
    def compute(self) -> dict[str, Any]: ...


def build_predictor(eval_cfg: DictConfig, task: str) -> Predictor:
    """The predictor `eval_cfg.predictor.<task>` names."""
    if task not in eval_cfg.predictor:
        raise ConfigError(
            f"task={task} has no predictor in conf/eval; use one of {'|'.join(eval_cfg.predictor)}"
        )
    return instantiate(eval_cfg.predictor[task])


def build_evaluation(eval_cfg: DictConfig, task: str) -> tuple[Predictor, Evaluator]:
    """The predictor and evaluator that `eval_cfg.predictor.<task>` / `eval_cfg.evaluator.<task>` name."""
    if task not in eval_cfg.evaluator:
        raise ConfigError(
            f"task={task} has no evaluator in conf/eval; use one of {'|'.join(eval_cfg.evaluator)}"
        )
    return build_predictor(eval_cfg, task), instantiate(eval_cfg.evaluator[task])


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`: each image on exactly one rank, none repeated.

    (DistributedSampler pads ranks to equal length by repeating images, which would count them
    twice in a summed confusion matrix.)
    """

    def __init__(self, num_samples: int, rank: int | None = None, world_size: int | None = None):
        self.num_samples = num_samples
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class MetricPipeline:
    """CPU work on finished predictions, off the forward pass's path: `submit(fn, predictions, ...)`
    runs `fn` in one background thread, in submission order (so results equal the inline loop's),
    with at most `depth` batches waiting; `close()` waits for all of them. An error in `fn` is raised
    by the next `submit` or by `close`. With `depth=0` everything runs inline, at once.

    Device predictions are copied to the host by the submitting thread (asynchronously into pinned
    memory on CUDA) and the worker waits for the copy, so the worker never queues behind the next
    forward pass on the device.
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="eomt-metrics") if depth > 0 else None
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., None], predictions: Any, *args: Any) -> None:
        if self._pool is None:
            fn(predictions, *args)
            return
        host, copied = to_host(predictions)
        self._pending.append(self._pool.submit(_run_after, copied, fn, host, *args))
        while len(self._pending) > self.depth:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait for all submitted work (raising the first error) and stop the thread."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._abort()

    def _abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> MetricPipeline:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the loop's own error is the one to see: drop the queued work
            self._abort()


def to_host(tree: Any) -> tuple[Any, torch.cuda.Event | None]:
    """`tree` (dicts, lists, tuples of tensors and plain values) with its tensors on the CPU.

    CUDA tensors are copied asynchronously into pinned memory; the returned event marks the end of
    the copies (None when nothing was on CUDA).
    """
    event = None

    def move(x: Any) -> Any:
        nonlocal event
        if isinstance(x, torch.Tensor):
            if x.device.type != "cuda":
                return x
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            event = event or torch.cuda.Event()
            return host
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(move(v) for v in x)
        return x

    moved = move(tree)
    if event is not None:
        event.record()
    return moved, event


@torch.inference_mode()
def _run_after(event: torch.cuda.Event | None, fn: Callable[..., None], *args: Any) -> None:
    if event is not None:
        event.synchronize()
    fn(*args)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[list[dict]],
    predictor: Predictor,
    evaluator: Evaluator,
    *,
    per_block: bool = False,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    description: str = "eval",
    pipeline: bool = True,
) -> dict[str, Any]:
    """Metrics of `model` on `loader` (batches of evaluation samples, `collate_eval`; samples with
    an "input" prepared by the loader's workers skip the predictor's own preparation).

    With `per_block`, the result also holds "per_block": {i: metrics of the prediction made
    before query block i} (the model must be built with masked attention, which makes them).
    With `pipeline`, evaluator updates and callbacks run in a background thread (`MetricPipeline`)
    and see predictions on the CPU; without, inline on the predictions as the predictor made them.
    The model is put in eval mode for the loop and given back in its previous mode.
    """
    block_evaluators = []
    if per_block:
        if not hasattr(model, "num_blocks"):
            raise AttributeError(f"{type(model).__name__} has no num_blocks: per-block metrics need an EoMT")
        block_evaluators = [copy.deepcopy(evaluator) for _ in range(int(model.num_blocks))]
    for ev in (evaluator, *block_evaluators):
        ev.reset()

    def consume(per_point: list[list[dict]], samples: list[dict]) -> None:
        for ev, predictions in zip(block_evaluators, per_point[:-1], strict=False):
            ev.update(predictions, samples)
        evaluator.update(per_point[-1], samples)
        for callback in callbacks:
            callback(per_point[-1], samples)

    with eval_mode(model), MetricPipeline(depth=2 if pipeline else 0) as metric_work:
        for samples in tqdm(
            loader, desc=description, disable=not (progress and distributed.is_main()), dynamic_ncols=True
        ):
            inputs = [s.get("input", s["image"]) for s in samples]  # prepared by the loader, or raw
            per_point = predictor.predict(model, inputs, all_blocks=per_block)
            if per_block and len(per_point) != len(block_evaluators) + 1:
                raise ValueError(
                    f"the model made {len(per_point)} predictions, expected num_blocks + 1 = {len(block_evaluators) + 1}"
                )
            metric_work.submit(consume, per_point, samples)

    metrics = evaluator.compute()
    if per_block:
        metrics["per_block"] = {i: ev.compute() for i, ev in enumerate(block_evaluators)}
    return metrics


@contextmanager
def eval_mode(model: nn.Module, masked: bool | None = None) -> Iterator[nn.Module]:
    """`model` in eval mode and, with `masked` given, masked attention on or off (models without it are
    left alone); both given back as they were."""
    was_training, was_masked = model.training, getattr(model, "masked_attn", None)
    model.eval()
    if masked is not None and was_masked is not None:
        model.masked_attn = masked
    try:
        yield model
    finally:
        model.train(was_training)
        if was_masked is not None:
            model.masked_attn = was_masked


@dataclass
class EvaluationResult:
    """What one `Evaluation.run` found: the evaluator's metrics (every rank), the metrics.json
    record (rank 0 with a run directory, else empty) and this rank's [prediction | ground truth]
    overlays as (image_id, uint8 (3,H,W))."""

    metrics: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)
    overlays: list[tuple[Any, Any]] = field(default_factory=list)


class Evaluation:
    """One split, its predictor and evaluator, built once; `run(model)` scores a model on them."""

    def __init__(
        self,
        *,
        dataset: Dataset,
        predictor: Predictor,
        evaluator: Evaluator,
        task: str,
        dataset_name: str,
        class_names: Sequence[str] | None,
        device: torch.device,
        batch_size: int = 2,
        num_workers: int = 0,
        num_overlays: int = 4,
        masked_attn: bool = False,
        per_block: bool = False,
        precision: str = "fp32",
        cpu_precision: str = "fp32",
        crop: Sequence[int] | None = None,
        compile_fps: str | bool = "auto",
        pipeline: bool = True,
    ):
        """`crop`: the network's input size; given, the loader's workers resize each image for the
        network (PIL, as the release) so the accelerator gets it ready. `compile_fps`: time the forward
        pass compiled (`eomt.compilation.compile_for_inference`), as the paper's FPS; auto = on CUDA.
        `pipeline`: metric updates and callbacks in a background thread (`MetricPipeline`),
        overlapping the next forward."""
        self.dataset = dataset
        self.predictor = predictor
        self.evaluator = evaluator
        self.task = task
        self.dataset_name = dataset_name
        self.class_names = class_names
        self.device = device
        self.num_overlays = num_overlays
        self.masked = bool(masked_attn or per_block)  # per-block predictions need masked attention
        self.per_block = per_block
        self.precision = precision
        self.cpu_precision = cpu_precision
        self.compile_fps = device.type == "cuda" if compile_fps == "auto" else bool(compile_fps)
        self.pipeline = pipeline
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=ShardSampler(len(dataset)),
            collate_fn=collate_eval
            if crop is None
            else partial(collate_eval, prepare=partial(predictor.prepare, crop=tuple(crop))),
            num_workers=num_workers,
        )

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device) -> Evaluation:
        """The val split of `cfg.dataset` for `cfg.task`, with the `cfg.eval` settings."""
        task = cfg.task.name
        predictor, evaluator = build_evaluation(cfg.eval, task)
        return cls(
            dataset=build_dataset(cfg.dataset, task, "val", train=False),
            predictor=predictor,
            evaluator=evaluator,
            task=task,
            dataset_name=cfg.dataset.name,
            class_names=cfg.dataset.class_names,
            device=device,
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.eval.num_workers,
            num_overlays=cfg.eval.num_overlays,
            masked_attn=cfg.eval.masked_attn,
            per_block=cfg.eval.per_block,
            precision=cfg.eval.precision,
            cpu_precision=cfg.eval.cpu_precision,
            crop=tuple(cfg.model.img_size),
            compile_fps=cfg.eval.compile_fps,
            pipeline=cfg.eval.pipeline,
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
    ) -> EvaluationResult:
        """Score `model`; with `benchmark`, also time its forward pass for metrics.json (fps, gflops)."""
        names = self.class_names or getattr(self.dataset, "class_names", None)  # null: the data's own
        overlays = OverlayCollector(self.task, names, self.num_overlays)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with eval_mode(model, masked=self.masked):
                metrics = evaluate(
                    model,
                    self.loader,
                    self.predictor,
                    self.evaluator,
                    per_block=self.per_block,
                    callbacks=[overlays, *callbacks],
                    description=f"eval {self.dataset_name} {self.task}",
                    pipeline=self.pipeline,
                )
        result = EvaluationResult(metrics, overlays=overlays.overlays)
        if not distributed.is_main():
            return result
        headline = scalar_metrics(metrics)
        log.info("%s\n%s", f"step {step}" if step is not None else "evaluation", format_table(metrics))
        if run_dir is not None:
            result.record = {
                "task": self.task,
                "dataset": self.dataset_name,
                "step": step,
                "metrics": headline,
                "params": count_params(model) or None,  # None: an exported file's runtime
                "details": _plain(metrics),
            }
            if benchmark:
                result.record.update(self.forward_cost(model))
            write_json(Path(run_dir) / METRICS_FILE, result.record, indent=2)
        if writer is not None:
            for name, value in headline.items():
                writer.add_scalar(f"val/{name}", value, step)
            for i, (image_id, image) in enumerate(result.overlays):
                writer.add_image(f"val/overlay{i}_{image_id}", torch.as_tensor(image), step)
        return result

    def forward_cost(self, model: nn.Module) -> dict[str, float]:
        """GFLOPs and images/s of the network alone at batch 1 and the crop size, as the paper reports."""
        images = torch.rand(1, 3, *model.img_size, device=self.device)
        with (
            eval_mode(model, masked=self.masked),
            inference_autocast(self.device, self.precision, self.cpu_precision),
        ):
            # an exported file's runtime (no parameters here) runs outside PyTorch's FLOP counter
            has_params = next(model.parameters(), None) is not None
            gflops = gflops_per_image(model, images) if has_params else None
            compiled = self.compile_fps and has_params
            network = compile_for_inference(model) if compiled else model
            iters = 50 if self.device.type == "cuda" else 3
            meter = LoadMeter()
            fps = images_per_second(network, images, iters=iters, warmup=min(iters, 10))
            conditions = meter.conditions()
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "gflops": gflops,
            "fps": fps,
            "fps_device": device_name,
            "fps_compiled": compiled,
            # other processes' share of this process's CPUs while timing, and the idle share: under_load
            # (eomt.profiling.LoadMeter) marks the FPS, and eomt.report leaves it out of its plot
            **{f"fps_{key}": value for key, value in conditions.items()},
        }


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
