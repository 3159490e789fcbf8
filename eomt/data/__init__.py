"""Datasets read straight from their published zips, the training augmentation, batching, and
small generated datasets in the same layouts. See docs/architecture.md ("Samples") for what a
sample holds and eomt.data.base for how corrupt files are skipped and counted (`skipped`)."""

from eomt.data.ade20k import ADE20KPanoptic, ADE20KSemantic
from eomt.data.base import CorruptSampleWarning, SegmentationDataset
from eomt.data.build import build_dataset, check_task, supported_tasks
from eomt.data.cityscapes import CityscapesInstance, CityscapesPanoptic, CityscapesSemantic
from eomt.data.coco import CocoInstance, CocoPanoptic, CocoSemantic
from eomt.data.collate import collate_eval, collate_train, count_skipped
from eomt.data.custom import CustomPanoptic
from eomt.data.decode import CorruptFileError
from eomt.data.transforms import TrainTransform

__all__ = [
    "ADE20KPanoptic",
    "ADE20KSemantic",
    "CityscapesInstance",
    "CityscapesPanoptic",
    "CityscapesSemantic",
    "CocoInstance",
    "CocoPanoptic",
    "CocoSemantic",
    "CorruptFileError",
    "CorruptSampleWarning",
    "CustomPanoptic",
    "SegmentationDataset",
    "TrainTransform",
    "build_dataset",
    "check_task",
    "collate_eval",
    "collate_train",
    "count_skipped",
    "supported_tasks",
]
