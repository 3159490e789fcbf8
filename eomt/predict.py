"""Run a checkpoint on your own images.

    python -m eomt.predict checkpoint=<file|run dir> input=<image|folder> output=<dir> [model=vit_l dataset=coco task=panoptic ...]
    python -m eomt.predict runtime=onnxruntime model_file=<file.onnx> input=<image|folder> output=<dir>

`checkpoint`, `input` and `output` (and optionally `device=auto|cpu|cuda`, `batch_size=1`, `compile=true`
to torch.compile the network) are this command's own arguments; every other argument is a Hydra override
of the training config (conf/train.yaml), which picks the network, the class names and the task's
post-processing (`eval.predictor.<task>`, e.g. `eval.predictor.panoptic.score_threshold=0.5`). A run
directory (or a checkpoint in one), a Transformers folder and a released name bring their own network
and classes (eomt.checkpoint_config); overrides still win.

`runtime=onnxruntime|openvino|torch-export` runs a file written by `python -m eomt.export` (`model_file=`, no
checkpoint) through the same pre- and post-processing: the file's metadata gives the task and the classes
(a `dataset=`/`task=` override must agree with them).

On a CPU with native bf16 (AVX512-BF16 or AMX), `eval.cpu_precision=bf16` runs runtime=torch under bf16
autocast and runtime=openvino at bf16: faster, at bf16 accuracy (README, Deploying, has both measured).

Written to `output`:
- overlays/<image>.png: the prediction painted on the image with class names;
- panoptic: panoptic/<image>.png (COCO id = R + 256 G + 256^2 B) and panoptic.json (COCO panoptic);
  semantic: semantic/<image>.png (class ids); instance: instances.json (COCO results, RLE masks);
- categories.json: class id -> name (and whether it is a thing).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from tqdm import tqdm

from eomt import api
from eomt.atomic import write_json
from eomt.checkpoint_config import compose_for
from eomt.compilation import compile_for_inference
from eomt.config import check_config, compose, split_key_values
from eomt.device import resolve_device
from eomt.errors import ConfigError, DataError, user_errors
from eomt.evaluation import build_predictor
from eomt.inference.runtime import load_exported
from eomt.inference.writers import (
    CocoInstanceWriter,
    CocoPanopticWriter,
    SemanticPngWriter,
    write_png,
)
from eomt.visualize import overlay_prediction

log = logging.getLogger("eomt.predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
USAGE = (
    "usage: python -m eomt.predict checkpoint=<file> input=<image|folder> output=<dir> [hydra overrides ...]"
    " | runtime=onnxruntime model_file=<file.onnx> input=... output=..."
)


@dataclass
class PredictArgs:
    checkpoint: str | None  # a path, run directory or hub name (a string: Path would fold hf://)
    input: Path
    output: Path
    device: str = "auto"
    batch_size: int = 1
    runtime: str = "torch"  # torch (a checkpoint) | onnxruntime | torch-export (an exported model_file)
    model_file: Path | None = None
    compile: bool = False  # torch.compile the network (runtime=torch)


def parse_args(argv: Sequence[str]) -> tuple[PredictArgs, list[str]]:
    """Split `key=value` arguments into this command's own and the config overrides."""
    own, overrides = split_key_values(argv, PredictArgs.__dataclass_fields__, USAGE)
    runtime = own.get("runtime", "torch")
    model_key = "checkpoint" if runtime == "torch" else "model_file"
    missing = [k for k in (model_key, "input", "output") if k not in own]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)}; {USAGE}")
    compile_ = own.get("compile", "false").lower()
    if compile_ not in ("true", "false"):
        raise ConfigError(f"compile={own['compile']} must be true or false")
    if compile_ == "true" and runtime != "torch":
        raise ConfigError(f"compile=true compiles a PyTorch checkpoint; runtime={runtime} runs its own file")
    batch_size = own.get("batch_size", "1")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    args = PredictArgs(
        checkpoint=own.get("checkpoint"),
        input=Path(own["input"]),
        output=Path(own["output"]),
        device=own.get("device", "auto"),
        batch_size=int(batch_size),
        runtime=runtime,
        model_file=Path(own["model_file"]) if "model_file" in own else None,
        compile=compile_ == "true",
    )
    return args, overrides


def find_images(path: Path) -> list[Path]:
    """The image itself, or the images under a folder (recursively, sorted)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"input={path} does not exist; pass an image file or a folder of images")
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    return images


def load_image(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def output_name(path: Path, root: Path) -> str:
    """A flat, unique file name for an input image: sub/dir/x.jpg -> sub__dir__x.jpg."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return relative.as_posix().replace("/", "__")


def load_network(
    args: PredictArgs, overrides: list[str], device: torch.device
) -> tuple[nn.Module, DictConfig]:
    """The network and the config naming its task, classes and post-processing.

    runtime=torch: a checkpoint and the composed config. Otherwise an exported file, whose metadata fills
    in the task and classes (and is checked against `dataset=`/`task=` overrides when given).
    """
    if args.runtime == "torch":
        cfg = compose_for(overrides, args.checkpoint)  # a release's preset, a run's or Transformers' config
        check_config(cfg)
        return api.load_model(cfg.model, args.checkpoint).to(device), cfg
    cfg = compose(overrides)
    check_config(cfg)
    network = load_exported(
        args.runtime, args.model_file, "auto" if args.device == "auto" else device, cfg.eval.cpu_precision
    )
    meta = network.metadata
    if any(o.lstrip("+~").split("=")[0].split(".")[0] in ("dataset", "task") for o in overrides):
        meta.check_matches(cfg.task.name, list(cfg.dataset.class_names), args.model_file)
    OmegaConf.update(cfg, "task.name", meta.task)
    OmegaConf.update(cfg, "dataset.class_names", meta.class_names, merge=False)
    OmegaConf.update(cfg, "dataset.thing_classes", meta.thing_classes, merge=False)
    return network, cfg


def run_network(predictor, model: nn.Module, inputs: list, compiled: bool) -> list[dict]:
    """The predictor's predictions; a failing torch.compile says so in one line."""
    try:
        return predictor(model, inputs)
    except Exception as e:
        if not (compiled and isinstance(e, torch._dynamo.exc.TorchDynamoException)):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"compile=true failed ({type(e).__name__}: {first}); run without compile=true"
        ) from e


def main(argv: Sequence[str] | None = None) -> Path:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    images = find_images(args.input)
    device = resolve_device(args.device)
    model, cfg = load_network(args, overrides, device)
    if args.compile:
        model = compile_for_inference(model)
    task = cfg.task.name
    class_names = list(cfg.dataset.class_names or (str(i) for i in range(cfg.dataset.num_classes)))
    thing_classes = set(cfg.dataset.thing_classes)
    predictor = build_predictor(cfg.eval, task)
    crop = tuple(model.img_size)  # the network's input size (an exported file's own)
    writers = {
        "panoptic": lambda: CocoPanopticWriter(
            args.output,
            categories=[
                {"id": i, "name": n, "isthing": int(i in thing_classes)} for i, n in enumerate(class_names)
            ],
        ),
        "semantic": lambda: SemanticPngWriter(args.output / "semantic"),
        "instance": lambda: CocoInstanceWriter(args.output / "instances.json"),
    }
    writer = writers[task]()
    write_json(
        args.output / "categories.json",
        [{"id": i, "name": n, "isthing": i in thing_classes} for i, n in enumerate(class_names)],
    )

    skipped = []
    for start in tqdm(range(0, len(images), args.batch_size), desc="predict", unit="batch"):
        paths = images[start : start + args.batch_size]
        samples = []
        for path in paths:
            try:
                image = load_image(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                skipped.append(path)
                continue
            name = output_name(path, args.input)
            # the same preparation as evaluation's loader (PIL BILINEAR resize, as the release)
            network_input = predictor.prepare(image, crop=crop)
            samples.append({"image": image, "input": network_input, "image_id": name, "file_name": name})
        if not samples:
            continue
        predictions = run_network(predictor, model, [s["input"] for s in samples], args.compile)
        writer(predictions, samples)
        for prediction, sample in zip(predictions, samples, strict=True):
            overlay = overlay_prediction(task, sample["image"], prediction, None, class_names)
            write_png(
                args.output / "overlays" / (Path(sample["file_name"]).stem + ".png"),
                overlay.transpose(1, 2, 0),
            )
    writer.close()
    done = len(images) - len(skipped)
    note = f"; skipped {len(skipped)} unreadable (see the warnings naming them)" if skipped else ""
    print(f"wrote {done} predictions ({task}) to {args.output}{note}")
    return args.output


if __name__ == "__main__":
    with user_errors():
        main()
