"""Metrics of the three tasks: panoptic quality, mIoU, mask AP (COCO and Cityscapes conventions).

Evaluators share one interface: `reset()`, `update(predictions, samples)`, `compute() -> dict`,
where `compute()` combines all DDP ranks and returns the same result on every rank.
"""

from eomt.metrics.instance import InstanceEvaluator, coco_mask_ap
from eomt.metrics.panoptic import PanopticEvaluator, pq_compute, pq_image_stats, summarize_pq
from eomt.metrics.semantic import SemanticEvaluator, confusion_matrix, semantic_metrics

__all__ = [
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SemanticEvaluator",
    "coco_mask_ap",
    "confusion_matrix",
    "pq_compute",
    "pq_image_stats",
    "semantic_metrics",
    "summarize_pq",
]
