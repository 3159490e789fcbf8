"""The evaluation loop shared by train.py and evaluate.py.

    predictor, evaluator = build_evaluation(cfg.eval, cfg.task.name)
    loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, sampler=ShardSampler(len(val_set)),
                        collate_fn=collate_eval, num_workers=cfg.eval.num_workers)
    metrics = evaluate(model, loader, predictor, evaluator, per_block=cfg.eval.per_block,
                       callbacks=[OverlayCollector(...), CocoPanopticWriter(...)])
    print(format_table(metrics))

Every rank runs its share of the images; `evaluate` returns the metrics of all of them on every
rank. Callbacks see each batch's final predictions with their samples (overlays, file writers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from eomt import distributed
from eomt.inference.predictor import Predictor

Callback = Callable[[Sequence[dict], Sequence[dict]], None]


class Evaluator(Protocol):
    def reset(self) -> None: ...
    def update(self, predictions: Sequence[dict], samples: Sequence[dict]) -> None: ...
    def compute(self) -> dict[str, Any]: ...


def build_predictor(eval_cfg: DictConfig, task: str) -> Predictor:
    """The predictor `eval_cfg.predictor.<task>` names."""
    if task not in eval_cfg.predictor:
        raise ValueError(
            f"task={task} has no predictor in conf/eval; use one of {'|'.join(eval_cfg.predictor)}"
        )
    return instantiate(eval_cfg.predictor[task])


def build_evaluation(eval_cfg: DictConfig, task: str) -> tuple[Predictor, Evaluator]:
    """The predictor and evaluator that `eval_cfg.predictor.<task>` / `eval_cfg.evaluator.<task>` name."""
    if task not in eval_cfg.evaluator:
        raise ValueError(
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
) -> dict[str, Any]:
    """Metrics of `model` on `loader` (batches of evaluation samples, `collate_eval`; samples with
    an "input" prepared by the loader's workers skip the predictor's own preparation).

    With `per_block`, the result also holds "per_block": {i: metrics of the prediction made
    before query block i} (the model must be built with masked attention, which makes them).
    The model is put in eval mode for the loop and given back in its previous mode.
    """
    block_evaluators = []
    if per_block:
        if not hasattr(model, "num_blocks"):
            raise AttributeError(f"{type(model).__name__} has no num_blocks: per-block metrics need an EoMT")
        block_evaluators = [copy.deepcopy(evaluator) for _ in range(int(model.num_blocks))]
    for ev in (evaluator, *block_evaluators):
        ev.reset()

    was_training = model.training
    model.eval()
    try:
        for samples in tqdm(
            loader, desc=description, disable=not (progress and distributed.is_main()), dynamic_ncols=True
        ):
            inputs = [s.get("input", s["image"]) for s in samples]  # prepared by the loader, or raw
            per_point = predictor.predict(model, inputs, all_blocks=per_block)
            if per_block and len(per_point) != len(block_evaluators) + 1:
                raise ValueError(
                    f"the model made {len(per_point)} predictions, expected num_blocks + 1 = {len(block_evaluators) + 1}"
                )
            for ev, predictions in zip(block_evaluators, per_point[:-1], strict=False):
                ev.update(predictions, samples)
            evaluator.update(per_point[-1], samples)
            for callback in callbacks:
                callback(per_point[-1], samples)
    finally:
        model.train(was_training)

    metrics = evaluator.compute()
    if per_block:
        metrics["per_block"] = {i: ev.compute() for i, ev in enumerate(block_evaluators)}
    return metrics
