"""Predictors: a batch of images of any sizes in, one prediction per image out, per task.

`predictor(model, images)` runs the network once on the batch (on the model's device, under
autocast when `precision` asks for it) and post-processes in float32. `predictor.predict(model,
images, all_blocks=True)` returns one list per prediction point of the network (one per query
block when masked attention is on, then the final one), for per-block metrics.

The network follows the `eomt.model.EoMT` contract: `model(images float (B,3,H,W) in [0,1]) ->
(mask_logits list of (B,Q,H/4,W/4), class_logits list of (B,Q,C+1))` and `model.img_size`.

Prediction formats (tensors on the model's device):
- panoptic: {"id_map": int32 (H,W), 0 = void, "segments": [{"id", "category_id", "isthing", "score"}]}
- instance: {"masks": bool (K,H,W), "labels": int64 (K,), "scores": float32 (K,)}
- semantic: {"semantic": int64 (H,W)}
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from eomt.device import AMP_DTYPES
from eomt.inference.postprocess import (
    instance_masks,
    instance_topk,
    panoptic_keep,
    panoptic_segments,
    semantic_scores,
    thing_mask,
)
from eomt.inference.resize import letterbox_batch, merge_windows, resize_logits, sliding_windows, unletterbox


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _crop_of(model: nn.Module) -> tuple[int, int]:
    if not hasattr(model, "img_size"):
        raise AttributeError(
            f"{type(model).__name__} has no img_size: pass the bare (or compiled) EoMT, not a DDP wrapper"
        )
    size = model.img_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Predictor:
    """Shared by the three tasks: autocast, forward, and the choice of prediction points."""

    def __init__(self, precision: str = "fp32"):
        if precision not in AMP_DTYPES:
            raise ValueError(f"precision={precision} is not one of {'|'.join(AMP_DTYPES)}")
        self.precision = precision

    def __call__(self, model: nn.Module, images: Sequence[torch.Tensor]) -> list[dict]:
        """Final predictions for uint8 images (3,H,W)."""
        return self.predict(model, images, all_blocks=False)[-1]

    @torch.inference_mode()
    def predict(
        self, model: nn.Module, images: Sequence[torch.Tensor], all_blocks: bool = False
    ) -> list[list[dict]]:
        """Predictions per prediction point (only the final one unless `all_blocks`), per image."""
        if len(images) == 0:
            return [[]]
        return self._predict(model, images, all_blocks)

    def _forward(
        self, model: nn.Module, batch: torch.Tensor, all_blocks: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dtype = AMP_DTYPES[self.precision]
        use_amp = dtype is not None and batch.device.type == "cuda"
        autocast = torch.autocast(batch.device.type, dtype=dtype) if use_amp else contextlib.nullcontext()
        with autocast:
            mask_logits, class_logits = model(batch)
        points = list(zip(mask_logits, class_logits, strict=True))
        if all_blocks and len(points) == 1:
            raise ValueError(
                "per-block predictions need a model built with masked_attn=true "
                "(it returns one prediction per query block); or set eval.per_block=false"
            )
        return points if all_blocks else points[-1:]

    def _predict(
        self, model: nn.Module, images: Sequence[torch.Tensor], all_blocks: bool
    ) -> list[list[dict]]:
        raise NotImplementedError


class PanopticPredictor(Predictor):
    """Letterbox inference + Mask2Former's panoptic rule (`eomt.inference.postprocess`)."""

    def __init__(
        self,
        thing_classes: Sequence[int],
        score_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        precision: str = "fp32",
    ):
        super().__init__(precision)
        self.thing_classes = [int(c) for c in thing_classes]
        self.score_threshold = score_threshold
        self.overlap_threshold = overlap_threshold

    def _predict(self, model, images, all_blocks):
        batch, boxes = letterbox_batch(images, _crop_of(model), _device_of(model))
        outputs = []
        for mask_logits, class_logits in self._forward(model, batch, all_blocks):
            num_classes = class_logits.shape[-1] - 1
            if self.thing_classes and max(self.thing_classes) >= num_classes:
                raise ValueError(
                    f"thing_classes go up to {max(self.thing_classes)} but the model has {num_classes} classes"
                )
            is_thing = thing_mask(num_classes, self.thing_classes, class_logits.device)
            predictions = []
            for image_masks, image_classes, box in zip(mask_logits, class_logits, boxes, strict=True):
                kept, scores, labels = panoptic_keep(image_classes, self.score_threshold)
                masks = unletterbox(image_masks[kept].float(), box)  # only kept queries are upsampled
                id_map, segments = panoptic_segments(masks, scores, labels, is_thing, self.overlap_threshold)
                predictions.append({"id_map": id_map, "segments": segments})
            outputs.append(predictions)
        return outputs


class InstancePredictor(Predictor):
    """Letterbox inference + top-k (query, class) pairs, masks at logit > 0."""

    def __init__(self, topk: int = 100, precision: str = "fp32"):
        super().__init__(precision)
        self.topk = topk

    def _predict(self, model, images, all_blocks):
        batch, boxes = letterbox_batch(images, _crop_of(model), _device_of(model))
        outputs = []
        for mask_logits, class_logits in self._forward(model, batch, all_blocks):
            predictions = []
            for image_masks, image_classes, box in zip(mask_logits, class_logits, boxes, strict=True):
                queries, labels, class_probs = instance_topk(image_classes, self.topk)
                masks, scores = instance_masks(unletterbox(image_masks[queries].float(), box), class_probs)
                predictions.append({"masks": masks, "labels": labels, "scores": scores})
            outputs.append(predictions)
        return outputs


class SemanticPredictor(Predictor):
    """Sliding-window inference; per-pixel class scores averaged over overlapping windows."""

    def __init__(self, precision: str = "fp32", windows_per_step: int | None = None):
        super().__init__(precision)
        self.windows_per_step = windows_per_step  # caps the network's batch (memory); None = all

    def _predict(self, model, images, all_blocks):
        crop = _crop_of(model)
        windows, layout = sliding_windows(images, crop, _device_of(model))
        step = self.windows_per_step or len(windows)
        chunks = [
            self._forward(model, windows[i : i + step], all_blocks) for i in range(0, len(windows), step)
        ]
        outputs = []
        for point in range(len(chunks[0])):
            per_window = []
            for chunk in chunks:
                mask_logits, class_logits = chunk[point]
                for j in range(len(mask_logits)):  # one window at a time: Q masks at the crop are large
                    per_window.append(
                        semantic_scores(
                            resize_logits(mask_logits[j : j + 1].float(), crop), class_logits[j : j + 1]
                        )
                    )
            merged = merge_windows(torch.cat(per_window), layout)
            outputs.append([{"semantic": scores.argmax(0)} for scores in merged])
        return outputs
