"""Small generated datasets in the exact published layouts (COCO, ADE20K, Cityscapes).

Tests and the demo cannot download anything, so they read these through the real loaders.
Each image is a scene a tiny model can learn: two stuff regions (sky above a wavy horizon,
ground below), one to five non-overlapping things of three shape classes (disc, box, triangle;
each with its own colour) at varied sizes, sometimes a crowd (a cluster of small discs annotated
as one crowd region) and sometimes a void patch (unannotated pixels).

    python -m eomt.data.synthetic --layout coco --out DIR --train 100 --val 20 --size 64x64 --seed 0
    python train.py dataset=coco dataset.root=DIR model=tiny debug=smoke   # COCO's own 133 categories
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from eomt.data.ade20k import INSTANCE_TO_SEMANTIC
from eomt.errors import ConfigError, user_errors

THINGS = ("disc", "box", "triangle")
STUFF = ("sky", "ground")
CLASS_NAMES = THINGS + STUFF  # contiguous ids 0..4, things first
FORMAT_VERSION = 2  # bump when the generated content changes, so cached copies are regenerated

_THING_COLORS = np.array([(220, 50, 50), (50, 190, 70), (235, 215, 40)], dtype=np.float32)
_SKY, _GROUND, _VOID = (100, 150, 230), (125, 95, 55), (128, 128, 128)


@dataclass
class Segment:
    cls: int  # index into CLASS_NAMES
    mask: np.ndarray  # (H, W) bool
    is_crowd: bool = False
    polygons: list[list[float]] | None = None  # the polygons that draw a (non-crowd) thing


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    segments: list[Segment]  # pixels in no segment are void


def _rasterize(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def _shape_polygon(cls: int, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    corners = {0: 20, 1: 4, 2: 3}[cls]  # disc, box, triangle
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], 1).ravel().tolist()


def _place(taken: np.ndarray, draw: Callable[[], tuple]) -> tuple | None:
    """Call `draw` until its mask is non-trivial and clear of `taken` (pixels and their neighbours)."""
    for _ in range(30):
        result = draw()
        mask = result[0]
        grown = mask | np.roll(mask, 1, 0) | np.roll(mask, -1, 0) | np.roll(mask, 1, 1) | np.roll(mask, -1, 1)
        if mask.sum() >= 4 and not (grown & taken).any():
            return result
    return None


def draw_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """One random scene; see the module docstring."""
    ys, xs = np.arange(height)[:, None], np.arange(width)[None, :]
    horizon = height * rng.uniform(0.3, 0.7) + height * rng.uniform(0, 0.1) * np.sin(
        2 * np.pi * xs / width * rng.uniform(0.5, 2) + rng.uniform(0, 2 * np.pi)
    )
    sky = ys < horizon
    image = np.empty((height, width, 3), np.float32)
    image[:] = _GROUND
    image[sky] = _SKY
    image += ((ys / height * 30 - 15)[..., None] * np.array([1, 1, 0.5])).astype(np.float32)

    void = np.zeros((height, width), bool)
    if rng.random() < 0.5:
        h, w = (int(height * rng.uniform(0.1, 0.25)), int(width * rng.uniform(0.1, 0.25)))
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        void[y : y + h, x : x + w] = True
        image[void] = _VOID

    things: list[Segment] = []
    taken = np.zeros((height, width), bool)
    short = min(height, width)

    def thing() -> tuple:
        cls, radius = int(rng.integers(0, len(THINGS))), short * rng.uniform(0.07, 0.25)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        polygon = _shape_polygon(cls, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        return _rasterize([polygon], height, width), cls, [polygon]

    def crowd() -> tuple:
        cls, spread = int(rng.integers(0, len(THINGS))), short * 0.12
        cx, cy = rng.uniform(spread, width - spread), rng.uniform(spread, height - spread)
        polygons = [
            _shape_polygon(0, cx + dx, cy + dy, max(1.5, short * 0.035), 0.0)
            for dx, dy in rng.uniform(-spread, spread, size=(int(rng.integers(4, 8)), 2))
        ]
        return _rasterize(polygons, height, width), cls, polygons

    draws = [thing] * int(rng.integers(1, 6)) + ([crowd] if rng.random() < 0.4 else [])
    for draw in draws:
        placed = _place(taken, draw)
        if placed is None:
            continue
        mask, cls, polygons = placed
        is_crowd = draw is crowd
        color = _THING_COLORS[cls] + rng.normal(0, 12, 3)
        image[mask] = color
        taken |= mask
        things.append(Segment(cls, mask, is_crowd, None if is_crowd else polygons))

    image += rng.standard_normal(image.shape, dtype=np.float32) * 6
    image = np.clip(image, 0, 255).astype(np.uint8)
    free = ~taken & ~void
    stuff = [Segment(len(THINGS) + i, region & free) for i, region in enumerate((sky, ~sky))]
    return Scene(image, things + [s for s in stuff if s.mask.any()])


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (used for crowd regions): column-major run lengths, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": list(mask.shape)}


def _scenes(seed: int, split_index: int, count: int, height: int, width: int):
    rng = np.random.default_rng([seed, split_index])
    for i in range(count):
        yield i, draw_scene(rng, height, width)


# --- COCO --------------------------------------------------------------------------------------

# Category ids are deliberately not in things-first order ("sky" has id 2), like nothing in COCO
# itself, so that tests see the contiguous mapping at work. What `dataset=synthetic` reads.
COCO_CATEGORIES = [
    {"id": 1, "name": "disc", "isthing": 1, "supercategory": "shape", "color": [220, 50, 50]},
    {"id": 2, "name": "sky", "isthing": 0, "supercategory": "background", "color": list(_SKY)},
    {"id": 3, "name": "box", "isthing": 1, "supercategory": "shape", "color": [50, 190, 70]},
    {"id": 7, "name": "triangle", "isthing": 1, "supercategory": "shape", "color": [235, 215, 40]},
    {"id": 150, "name": "ground", "isthing": 0, "supercategory": "background", "color": list(_GROUND)},
]
_COCO_ID = {c["name"]: c["id"] for c in COCO_CATEGORIES}

# COCO's own category ids (80 things in 1..90, 53 merged stuff classes in 92..200), in the order of
# conf/dataset/coco.yaml's class names, which they are paired with: what `dataset=coco` reads.
_COCO_THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
_COCO_STUFF_IDS = [
    92, 93, 95, 100, 107, 109, 112, 118, 119, 122, 125, 128, 130, 133, 138, 141, 144, 145, 147, 148, 149,
    151, 154, 155, 156, 159, 161, 166, 168, 171, 175, 176, 177, 178, 180, 181, 184, 185, 186, 187, 188,
    189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200,
]  # fmt: skip
# The scene classes as COCO classes: disc, box, triangle; sky, ground.
_AS_COCO = {
    "disc": "sports ball",
    "box": "tv",
    "triangle": "kite",
    "sky": "sky-other-merged",
    "ground": "dirt-merged",
}
CATEGORY_SETS = ("coco", "shapes")  # the published COCO categories | the five shape classes


def coco_categories() -> tuple[list[dict], dict[str, int]]:
    """COCO's 133 panoptic categories (names from conf/dataset/coco.yaml) and each scene class's id."""
    from omegaconf import OmegaConf

    from eomt.config import CONF_DIR

    coco = OmegaConf.load(CONF_DIR / "dataset" / "coco.yaml")
    things, stuff = list(coco.instance.class_names), list(coco.panoptic.stuff_names)
    if (len(things), len(stuff)) != (len(_COCO_THING_IDS), len(_COCO_STUFF_IDS)):
        raise AssertionError("conf/dataset/coco.yaml no longer has COCO's 80 + 53 class names")
    categories = [
        {"id": i, "name": n, "isthing": int(is_thing), "supercategory": "thing" if is_thing else "stuff"}
        for ids, names, is_thing in ((_COCO_THING_IDS, things, True), (_COCO_STUFF_IDS, stuff, False))
        for i, n in zip(ids, names, strict=True)
    ]
    ids = {c["name"]: c["id"] for c in categories}
    return categories, {scene: ids[name] for scene, name in _AS_COCO.items()}


def write_coco(
    out: Path, splits: dict[str, int], height: int, width: int, seed: int, categories: str = "shapes"
) -> None:
    """train2017.zip, val2017.zip, annotations_trainval2017.zip, panoptic_annotations_trainval2017.zip;
    `categories`: "shapes" (the five scene classes) or "coco" (COCO's 133, the scene classes among them)."""
    category_list, scene_ids = coco_categories() if categories == "coco" else (COCO_CATEGORIES, _COCO_ID)
    with (
        zipfile.ZipFile(out / "annotations_trainval2017.zip", "w", zipfile.ZIP_DEFLATED) as instances_zip,
        zipfile.ZipFile(
            out / "panoptic_annotations_trainval2017.zip", "w", zipfile.ZIP_DEFLATED
        ) as panoptic_zip,
    ):
        for split_index, (split, count) in enumerate(splits.items()):
            _write_coco_split(
                instances_zip,
                panoptic_zip,
                out,
                split_index,
                split,
                count,
                (height, width),
                seed,
                category_list,
                scene_ids,
            )


def _write_coco_split(
    instances_zip: zipfile.ZipFile,
    panoptic_zip: zipfile.ZipFile,
    out: Path,
    split_index: int,
    split: str,
    count: int,
    size: tuple[int, int],
    seed: int,
    categories: list[dict],
    scene_ids: dict[str, int],
) -> None:
    height, width = size
    name = f"{split}2017"
    images, instances, panoptic = [], [], []
    png_buffer = io.BytesIO()
    with (
        zipfile.ZipFile(out / f"{name}.zip", "w", zipfile.ZIP_STORED) as image_zip,
        zipfile.ZipFile(png_buffer, "w", zipfile.ZIP_STORED) as png_zip,
    ):
        for i, scene in _scenes(seed, split_index, count, height, width):
            image_id = (split_index + 1) * 100000 + i
            file_name = f"{image_id:012d}.jpg"
            image_zip.writestr(f"{name}/{file_name}", _encode(scene.image, "JPEG"))
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            rng = np.random.default_rng([seed, split_index, i, 1])
            ids: set[int] = set()
            while len(ids) < len(scene.segments):
                ids.add(int(rng.integers(1, 2**24)))
            id_map = np.zeros((height, width), np.int64)
            segments_info = []
            for segment_id, seg in zip(sorted(ids), scene.segments, strict=True):
                category_id = scene_ids[CLASS_NAMES[seg.cls]]
                id_map[seg.mask] = segment_id
                area, bbox = int(seg.mask.sum()), _bbox(seg.mask)
                segments_info.append(
                    {
                        "id": segment_id,
                        "category_id": category_id,
                        "iscrowd": int(seg.is_crowd),
                        "area": area,
                        "bbox": bbox,
                    }
                )
                if seg.cls < len(THINGS):
                    segmentation = _uncompressed_rle(seg.mask) if seg.is_crowd else seg.polygons
                    instances.append(
                        {
                            "id": len(instances) + 1,
                            "image_id": image_id,
                            "category_id": category_id,
                            "segmentation": segmentation,
                            "area": float(area),
                            "bbox": bbox,
                            "iscrowd": int(seg.is_crowd),
                        }
                    )
            rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], -1).astype(np.uint8)
            png_name = file_name.replace(".jpg", ".png")
            png_zip.writestr(f"panoptic_{name}/{png_name}", _encode(rgb, "PNG"))
            panoptic.append({"image_id": image_id, "file_name": png_name, "segments_info": segments_info})
    things = [c for c in categories if c["isthing"]]
    instances_zip.writestr(
        f"annotations/instances_{name}.json",
        json.dumps(
            {
                "images": images,
                "annotations": instances,
                "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in things],
            }
        ),
    )
    panoptic_zip.writestr(
        f"annotations/panoptic_{name}.json",
        json.dumps({"images": images, "annotations": panoptic, "categories": categories}),
    )
    # The PNGs travel as a zip inside the annotations zip, as published (stored, not recompressed).
    panoptic_zip.writestr(
        zipfile.ZipInfo(f"annotations/panoptic_{name}.zip", (2017, 1, 1, 0, 0, 0)),
        png_buffer.getvalue(),
        compress_type=zipfile.ZIP_STORED,
    )


# --- ADE20K ------------------------------------------------------------------------------------

# Scene classes as ADE20K label values (1..150): person, car, chair; sky, "earth, ground".
ADE20K_LABELS = (13, 21, 20, 3, 14)
_ADE20K_INSTANCE_CLASS = {label: INSTANCE_TO_SEMANTIC.index(label) + 1 for label in ADE20K_LABELS[:3]}
_ADE20K_SPLITS = {"train": "training", "val": "validation"}


def write_ade20k(out: Path, splits: dict[str, int], height: int, width: int, seed: int) -> None:
    """ADEChallengeData2016.zip and annotations_instance.zip."""
    with (
        zipfile.ZipFile(out / "ADEChallengeData2016.zip", "w", zipfile.ZIP_STORED) as main_zip,
        zipfile.ZipFile(out / "annotations_instance.zip", "w", zipfile.ZIP_STORED) as instance_zip,
    ):
        for split_index, (split, count) in enumerate(splits.items()):
            folder = _ADE20K_SPLITS[split]
            for i, scene in _scenes(seed, split_index, count, height, width):
                stem = f"ADE_{split}_{i + 1:08d}"
                semantic = np.zeros((height, width), np.uint8)
                instance = np.zeros((height, width, 3), np.uint8)
                for instance_id, seg in enumerate(scene.segments, start=1):
                    label = ADE20K_LABELS[seg.cls]
                    semantic[seg.mask] = label
                    if seg.cls < len(THINGS) and not seg.is_crowd:  # ADE20K has no crowd: no instance
                        instance[seg.mask] = (_ADE20K_INSTANCE_CLASS[label], instance_id, 0)
                main_zip.writestr(
                    f"ADEChallengeData2016/images/{folder}/{stem}.jpg", _encode(scene.image, "JPEG")
                )
                main_zip.writestr(
                    f"ADEChallengeData2016/annotations/{folder}/{stem}.png", _encode(semantic, "PNG")
                )
                instance_zip.writestr(f"annotations_instance/{folder}/{stem}.png", _encode(instance, "PNG"))


# --- Cityscapes --------------------------------------------------------------------------------

# Scene classes as Cityscapes labelIds: person, car, bicycle; sky, road. Void is "unlabeled" (0).
CITYSCAPES_LABELS = (24, 26, 33, 23, 7)
_CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def write_cityscapes(out: Path, splits: dict[str, int], height: int, width: int, seed: int) -> None:
    """leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (labelIds and instanceIds PNGs)."""
    with (
        zipfile.ZipFile(out / "leftImg8bit_trainvaltest.zip", "w", zipfile.ZIP_STORED) as image_zip,
        zipfile.ZipFile(out / "gtFine_trainvaltest.zip", "w", zipfile.ZIP_STORED) as label_zip,
    ):
        for split_index, (split, count) in enumerate(splits.items()):
            cities = _CITIES[split]
            for i, scene in _scenes(seed, split_index, count, height, width):
                city = cities[i % len(cities)]
                stem = f"{split}/{city}/{city}_{i:06d}_000019"
                label_ids = np.zeros((height, width), np.uint8)
                instance_ids = np.zeros((height, width), np.uint16)
                for instance_number, seg in enumerate(scene.segments):
                    label = CITYSCAPES_LABELS[seg.cls]
                    label_ids[seg.mask] = label
                    is_instance = seg.cls < len(THINGS) and not seg.is_crowd
                    instance_ids[seg.mask] = label * 1000 + instance_number if is_instance else label
                image_zip.writestr(f"leftImg8bit/{stem}_leftImg8bit.png", _encode(scene.image, "PNG"))
                label_zip.writestr(f"gtFine/{stem}_gtFine_labelIds.png", _encode(label_ids, "PNG"))
                label_zip.writestr(f"gtFine/{stem}_gtFine_instanceIds.png", _encode(instance_ids, "PNG"))


LAYOUTS: dict[str, Callable[[Path, dict[str, int], int, int, int], None]] = {
    "coco": write_coco,
    "ade20k": write_ade20k,
    "cityscapes": write_cityscapes,
}


def generate(
    layout: str,
    out: str | Path,
    num_train: int,
    num_val: int,
    size: tuple[int, int],
    seed: int = 0,
    categories: str = "shapes",
) -> Path:
    """Write a dataset in `layout` into folder `out` (created if needed). The COCO layout's
    `categories`: "shapes" (five, what `dataset=synthetic` reads) or "coco" (COCO's own 133, what
    `dataset=coco` reads); ADE20K and Cityscapes always use their published label values."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    if categories not in CATEGORY_SETS:
        raise ConfigError(f"categories={categories!r} is not one of {'|'.join(CATEGORY_SETS)}")
    height, width = size
    if min(height, width) < 16:
        raise ConfigError(f"size {height}x{width} is too small; use at least 16x16")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": num_train, "val": num_val}
    if layout == "coco":
        write_coco(out, splits, height, width, seed, categories)
    else:
        LAYOUTS[layout](out, splits, height, width, seed)
    return out


def ensure_generated(
    cache: str | Path, layout: str, num_train: int, num_val: int, size: tuple[int, int], seed: int = 0
) -> Path:
    """The folder under `cache` holding this dataset, generated on first use.

    Safe when several processes race: each generates into a temporary folder and renames it into
    place; a process that loses the race discards its copy and uses the winner's.
    """
    height, width = size
    target = (
        Path(cache) / f"{layout}-{height}x{width}-train{num_train}-val{num_val}-seed{seed}-v{FORMAT_VERSION}"
    )
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        generate(layout, tmp, num_train, num_val, size, seed)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def synthetic_dataset(
    loader: Callable[..., Dataset],
    root: str | Path,
    split: str,
    transform: Callable[[dict], dict] | None = None,
    on_corrupt: str = "skip",
    layout: str = "coco",
    num_train: int = 100,
    num_val: int = 20,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    skip_empty: bool = False,
) -> Dataset:
    """Generate (once, into the cache folder `root`) and read a synthetic dataset with `loader`,
    one of the real dataset classes (for the COCO layout: CocoPanoptic, CocoSemantic, CocoInstance)."""
    folder = ensure_generated(root, layout, num_train, num_val, (int(size[0]), int(size[1])), seed)
    return loader(root=folder, split=split, transform=transform, on_corrupt=on_corrupt, skip_empty=skip_empty)


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"size must look like 64x96 (HxW), got {text!r}") from e
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eomt.data.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the zips into")
    parser.add_argument("--train", type=int, default=100, help="number of training images")
    parser.add_argument("--val", type=int, default=20, help="number of validation images")
    parser.add_argument("--size", type=_size, default=(64, 64), help="image size HxW")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--categories",
        choices=CATEGORY_SETS,
        default="coco",
        help="COCO layout: COCO's own 133 categories (default; read with dataset=coco) or the five shape "
        "classes (what dataset=synthetic generates for itself)",
    )
    args = parser.parse_args(argv)
    out = generate(args.layout, args.out, args.train, args.val, args.size, args.seed, args.categories)
    print(
        f"wrote {args.layout} layout ({args.train} train, {args.val} val, {args.size[0]}x{args.size[1]}) to {out}"
    )


if __name__ == "__main__":
    with user_errors():
        main()
