"""Users' own data in the COCO panoptic format: images, a panoptic JSON and its PNGs.

Each of the three paths is relative to `root` (or absolute) and may contain `{split}`; images and
PNGs may each be a folder or a zip. Inside a zip the files may sit at the top or under one folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from eomt.data.panoptic_json import PanopticJson, PanopticJsonDataset
from eomt.data.zipreader import Store, open_store

HELP = "see conf/dataset/custom.yaml for the expected layout"


def _path(root: Path, template: str, split: str) -> Path:
    path = root / template.format(split=split)
    if not path.exists():
        raise FileNotFoundError(f"custom dataset: expected {path} ({HELP})")
    return path


def _prefix(store: Store, file_names: list[str]) -> str:
    """The folder inside `store` that holds `file_names` ('' when they sit at the top)."""
    if not file_names:
        return ""
    names = set(store.names())
    first = file_names[0]
    for name in sorted(names):
        if name == first or name.endswith("/" + first):
            return name[: len(name) - len(first)]
    raise ValueError(f"custom dataset: {first} (listed in the panoptic JSON) is not in {store}")


class CustomPanoptic(PanopticJsonDataset):
    """A panoptic dataset in the COCO panoptic format, classes taken from its JSON (things first)."""

    name = "custom panoptic"

    def __init__(
        self,
        root: str | Path,
        split: str,
        images: str = "images/{split}",
        annotations: str = "annotations/panoptic_{split}.json",
        masks: str = "annotations/panoptic_{split}",
        transform: Callable[[dict], dict] | None = None,
        on_corrupt: str = "skip",
        class_names: Sequence[str] | None = None,
        skip_empty: bool = False,
    ):
        self.layout = {"images": images, "annotations": annotations, "masks": masks}
        super().__init__(
            root,
            split,
            transform=transform,
            on_corrupt=on_corrupt,
            class_names=class_names,
            skip_empty=skip_empty,
        )

    def read_json(self) -> PanopticJson:
        json_path = _path(self.root, self.layout["annotations"], self.split)
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"custom dataset: {json_path} is not valid JSON ({e})") from e
        images = open_store(_path(self.root, self.layout["images"], self.split))
        masks = open_store(_path(self.root, self.layout["masks"], self.split))
        return PanopticJson(
            annotations=data,
            source=str(json_path),
            images=images,
            image_prefix=_prefix(images, [img["file_name"] for img in data["images"]]),
            masks=masks,
            mask_prefix=_prefix(masks, [ann["file_name"] for ann in data["annotations"]]),
        )
