"""Predictors: a batch of images of any sizes in, one prediction per image out, per task.

`predictor.prepare(image, crop)` resizes a uint8 image (3,H,W) for the network on the CPU (the
letterbox or the sliding windows of `eomt.inference.resize`, PIL's BILINEAR as the release):
evaluation calls it in the data-loading workers (`eomt.data.collate.collate_eval`).
`predictor(model, inputs)` takes those prepared inputs, or raw uint8 images which it prepares the
same way at the model's crop, runs the network once on the batch (on the model's device, under
autocast when `precision` (CUDA) or `cpu_precision` (CPU) asks for it) and post-processes in
float32, back at each image's original size. `predictor.predict(model, inputs, all_blocks=True)` returns one list per
prediction point of the network (one per query block when masked attention is on, then the
final one), for per-block metrics.

The network follows the `eomt.model.EoMT` contract: `model(images float (B,3,H,W) in [0,1]) ->
(mask_logits list of (B,Q,H/4,W/4), class_logits list of (B,Q,C+1))` and `model.img_size`.

Prediction formats (tensors on the model's device):
- panoptic: {"id_map": int32 (H,W), 0 = void, "segments": [{"id", "category_id", "isthing", "score"}]}
- instance: {"masks": bool (K,H,W), "labels": int64 (K,), "scores": float32 (K,)}, on the CPU also
  "boxes": int64 (K,4) (top, bottom, left, right; ends exclusive) holding every True pixel
- semantic: {"semantic": int64 (H,W)}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from eomt.device import AMP_DTYPES, CPU_PRECISIONS, inference_autocast
from eomt.inference.postprocess import (
    instance_masks_letterboxed,
    instance_topk,
    panoptic_keep,
    panoptic_segments,
    semantic_scores,
    thing_mask,
)
from eomt.inference.resize import (
    NetworkInput,
    letterbox,
    merge_windows,
    resize_logits,
    sliding_windows,
    unletterbox,
)
from eomt.model.size import as_pair


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _crop_of(model: nn.Module) -> tuple[int, int]:
    if not hasattr(model, "img_size"):
        raise AttributeError(
            f"{type(model).__name__} has no img_size: pass the bare (or compiled) EoMT, not a DDP wrapper"
        )
    return as_pair(model.img_size)


Input = NetworkInput | torch.Tensor  # prepared, or a raw uint8 image (3,H,W)


class Predictor:
    """Shared by the three tasks: input preparation, autocast, forward, the prediction points."""

    def __init__(self, precision: str = "fp32", cpu_precision: str = "fp32"):
        if precision not in AMP_DTYPES:
            raise ValueError(f"precision={precision} is not one of {'|'.join(AMP_DTYPES)}")
        if cpu_precision not in CPU_PRECISIONS:
            raise ValueError(f"cpu_precision={cpu_precision} is not one of {'|'.join(CPU_PRECISIONS)}")
        self.precision = precision
        self.cpu_precision = cpu_precision

    def prepare(self, image: torch.Tensor, crop: Sequence[int]) -> NetworkInput:
        """uint8 image (3,H,W) -> the network input of this task at `crop` (CPU work)."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, inputs: Sequence[Input]) -> list[dict]:
        """Final predictions for prepared inputs or uint8 images (3,H,W)."""
        return self.predict(model, inputs, all_blocks=False)[-1]

    @torch.inference_mode()
    def predict(
        self, model: nn.Module, inputs: Sequence[Input], all_blocks: bool = False
    ) -> list[list[dict]]:
        """Predictions per prediction point (only the final one unless `all_blocks`), per image."""
        if len(inputs) == 0:
            return [[]]
        return self._predict(model, self._prepared(model, inputs), all_blocks)

    def _prepared(self, model: nn.Module, inputs: Sequence[Input]) -> list[NetworkInput]:
        crop = _crop_of(model)
        prepared = [x if isinstance(x, NetworkInput) else self.prepare(x, crop) for x in inputs]
        for x in prepared:
            if x.crop != crop:
                raise ValueError(
                    f"inputs were prepared at crop {list(x.crop)} but the model's img_size is {list(crop)}; "
                    "prepare them at the model's img_size"
                )
        return prepared

    @staticmethod
    def _batch(model: nn.Module, inputs: Sequence[NetworkInput]) -> torch.Tensor:
        """The crops of all inputs as one float batch in [0,1] on the model's device."""
        crops = torch.cat([x.crops for x in inputs])
        return crops.to(_device_of(model), non_blocking=True).float() / 255.0

    def _forward(
        self, model: nn.Module, batch: torch.Tensor, all_blocks: bool
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with inference_autocast(batch.device, self.precision, self.cpu_precision):
            mask_logits, class_logits = model(batch)
        points = list(zip(mask_logits, class_logits, strict=True))
        if all_blocks and len(points) == 1:
            raise ValueError(
                "per-block predictions need a model built with masked_attn=true "
                "(it returns one prediction per query block); or set eval.per_block=false"
            )
        return points if all_blocks else points[-1:]

    def _predict(
        self, model: nn.Module, inputs: Sequence[NetworkInput], all_blocks: bool
    ) -> list[list[dict]]:
        raise NotImplementedError


class LetterboxPredictor(Predictor):
    """Instance and panoptic: each image is resized to fit the crop and padded (one crop per image)."""

    def prepare(self, image: torch.Tensor, crop: Sequence[int]) -> NetworkInput:
        return letterbox(image, crop)

    def _predict(self, model, boxes, all_blocks):
        batch = self._batch(model, boxes)
        outputs = []
        for mask_logits, class_logits in self._forward(model, batch, all_blocks):
            shared = self._shared(class_logits)
            images = zip(mask_logits, class_logits, boxes, strict=True)
            outputs.append([self._image(masks, classes, box, shared) for masks, classes, box in images])
        return outputs

    def _shared(self, class_logits: torch.Tensor) -> Any:
        """What every image of one prediction point uses (computed once per point)."""
        return None

    def _image(self, masks: torch.Tensor, classes: torch.Tensor, box: NetworkInput, shared: Any) -> dict:
        """One image's prediction from its (Q,h,w) mask and (Q,C+1) class logits."""
        raise NotImplementedError


class PanopticPredictor(LetterboxPredictor):
    """Letterbox inference + Mask2Former's panoptic rule (`eomt.inference.postprocess`)."""

    def __init__(
        self,
        thing_classes: Sequence[int],
        score_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        precision: str = "fp32",
        cpu_precision: str = "fp32",
    ):
        super().__init__(precision, cpu_precision)
        self.thing_classes = [int(c) for c in thing_classes]
        self.score_threshold = score_threshold
        self.overlap_threshold = overlap_threshold

    def _shared(self, class_logits):
        num_classes = class_logits.shape[-1] - 1
        if self.thing_classes and max(self.thing_classes) >= num_classes:
            raise ValueError(
                f"thing_classes go up to {max(self.thing_classes)} but the model has {num_classes} classes"
            )
        return thing_mask(num_classes, self.thing_classes, class_logits.device)

    def _image(self, masks, classes, box, is_thing):
        kept, scores, labels = panoptic_keep(classes, self.score_threshold)
        masks = unletterbox(masks[kept].float(), box)  # only kept queries are upsampled
        id_map, segments = panoptic_segments(masks, scores, labels, is_thing, self.overlap_threshold)
        return {"id_map": id_map, "segments": segments}


class InstancePredictor(LetterboxPredictor):
    """Letterbox inference + top-k (query, class) pairs, masks at logit > 0."""

    def __init__(self, topk: int = 100, precision: str = "fp32", cpu_precision: str = "fp32"):
        super().__init__(precision, cpu_precision)
        self.topk = topk

    def _image(self, masks, classes, box, shared):
        queries, labels, class_probs = instance_topk(classes, self.topk)
        masks, scores, mask_boxes = instance_masks_letterboxed(masks, queries, class_probs, box)
        prediction = {"masks": masks, "labels": labels, "scores": scores}
        if mask_boxes is not None:  # where each mask's pixels lie: RLE encoding reads only there
            prediction["boxes"] = mask_boxes
        return prediction


class SemanticPredictor(Predictor):
    """Sliding-window inference; per-pixel class scores averaged over overlapping windows."""

    def __init__(
        self, precision: str = "fp32", windows_per_step: int | None = None, cpu_precision: str = "fp32"
    ):
        super().__init__(precision, cpu_precision)
        self.windows_per_step = windows_per_step  # caps the network's batch (memory); None = all

    def prepare(self, image: torch.Tensor, crop: Sequence[int]) -> NetworkInput:
        return sliding_windows(image, crop)

    def _predict(self, model, inputs, all_blocks):
        crop = _crop_of(model)
        windows = self._batch(model, inputs)
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
            per_image = torch.split(torch.cat(per_window), [len(x.crops) for x in inputs])
            merged = [merge_windows(scores, x) for scores, x in zip(per_image, inputs, strict=True)]
            outputs.append([{"semantic": scores.argmax(0)} for scores in merged])
        return outputs
