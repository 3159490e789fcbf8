"""Export the inference network to a deployment file: ONNX (ONNX Runtime and others) or torch.export (.pt2).

    python -m eomt.export checkpoint=<file|run dir> out=<file> [format=onnx|pt2] [input_dtype=float32|uint8] \
        [model=vit_l dataset=coco task=panoptic ...]

`checkpoint` is anything `eomt.api.load` reads (ours, the authors' release, Transformers); the other
arguments besides `out`, `format` (default: from the suffix of `out`) and `input_dtype` are Hydra overrides
that pick the network, the classes and the task, as for evaluate.py. The file holds the network as EoMT
runs at inference (masked attention off), for the input size of the model config and any batch size:

    images (B,3,H,W) float32 in [0,1] (or uint8 in [0,255] with input_dtype=uint8; normalisation is inside)
    -> mask_logits (B,Q,H/4,W/4), class_logits (B,Q,C+1)

and its `ExportMetadata` (task, classes, input size, backbone, config hash): ONNX `metadata_props`,
.pt2 extra file `eomt_metadata.json`. `python -m eomt.predict runtime=onnxruntime model_file=<file>` runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from eomt import api
from eomt.atomic import atomic_open, disk_full_as_one_line
from eomt.checkpoint_config import compose_for, training_config
from eomt.checkpointing import tensor_bytes
from eomt.config import split_key_values
from eomt.errors import ConfigError, require, user_errors
from eomt.export_metadata import PT2_METADATA_FILE, ExportMetadata
from eomt.model.size import as_pair

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
INPUT_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}
USAGE = (
    "usage: python -m eomt.export checkpoint=<file|run dir> out=<file.onnx|file.pt2> [hydra overrides ...]"
)


def config_hash(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def build_metadata(cfg: DictConfig, checkpoint: Path | None, input_dtype: str) -> ExportMetadata:
    run_config = training_config(checkpoint) if checkpoint is not None else None
    thing_classes = [int(c) for c in cfg.dataset.thing_classes]
    num_classes = int(cfg.dataset.num_classes)
    return ExportMetadata(
        task=cfg.task.name,
        class_names=[str(n) for n in cfg.dataset.class_names],
        thing_classes=thing_classes,
        stuff_classes=[c for c in range(num_classes) if c not in thing_classes],
        img_size=list(as_pair(cfg.model.img_size)),
        input_dtype=input_dtype,
        backbone=str(cfg.model.backbone),
        model_name=str(cfg.model.name),
        config_hash=config_hash(run_config or OmegaConf.to_container(cfg, resolve=True)),
        config_source="checkpoint" if run_config else "export",
    )


class InferenceNetwork(nn.Module):
    """EoMT's final prediction as two tensors; uint8 input is scaled to [0,1] inside the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.masked_attn:
            raise ConfigError("export the inference network: set model.masked_attn=false")
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dtype == torch.uint8:
            images = images.float() / 255
        mask_logits, class_logits = self.model(images)
        return mask_logits[-1], class_logits[-1]


def _example_input(network: nn.Module, metadata: ExportMetadata) -> tuple[Tensor, dict]:
    # Two images: a batch of 1 would let the exporter specialise the batch dimension.
    device = next(network.parameters()).device
    images = torch.zeros(2, 3, *metadata.img_size, dtype=INPUT_DTYPES[metadata.input_dtype], device=device)
    return images, {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}


def _weight_bytes(network: nn.Module) -> int:
    """About the size of an exported file: its weights."""
    return tensor_bytes(network.state_dict())


def export_onnx(network: InferenceNetwork, metadata: ExportMetadata, out: Path) -> None:
    require("onnxscript", "ONNX export")
    require("onnx", "ONNX export")
    images, dynamic = _example_input(network, metadata)
    program = torch.onnx.export(
        network,
        (images,),
        dynamo=True,
        dynamic_shapes=dynamic,
        input_names=["images"],
        output_names=["mask_logits", "class_logits"],
        verbose=False,
    )
    program.model.metadata_props.update(metadata.to_strings())
    # Written in a temporary folder first; weights over 2 GB go to an external `<name>.data` file next to it,
    # moved into place before the .onnx that names it.
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        disk_full_as_one_line(out, _weight_bytes(network)),
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp,
    ):
        program.save(Path(tmp) / out.name)
        files = sorted(Path(tmp).iterdir(), key=lambda p: p.name == out.name)
        for file in files:
            os.replace(file, out.parent / file.name)


def export_pt2(network: InferenceNetwork, metadata: ExportMetadata, out: Path) -> None:
    images, dynamic = _example_input(network, metadata)
    program = torch.export.export(network, (images,), dynamic_shapes=dynamic)
    with atomic_open(out, "wb", size=_weight_bytes(network)) as f:
        torch.export.save(program, f, extra_files={PT2_METADATA_FILE: json.dumps(asdict(metadata))})


EXPORTERS = {"onnx": export_onnx, "pt2": export_pt2}


def export(model: nn.Module, metadata: ExportMetadata, out: str | Path, format: str | None = None) -> Path:
    """Write `model` (an EoMT built with masked_attn=false) to `out` as ONNX or .pt2."""
    out = Path(out)
    format = format or FORMATS.get(out.suffix)
    if format not in EXPORTERS:
        raise ConfigError(
            f"format={format} for out={out}: use format=onnx|pt2 (or an .onnx / .pt2 file name)"
        )
    if metadata.input_dtype not in INPUT_DTYPES:
        raise ConfigError(f"input_dtype={metadata.input_dtype} is not one of {'|'.join(INPUT_DTYPES)}")
    network = InferenceNetwork(model).eval()
    EXPORTERS[format](network, metadata, out)
    return out


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    own, overrides = split_key_values(argv, {"checkpoint", "out", "format", "input_dtype"}, USAGE)
    missing = [k for k in ("checkpoint", "out") if k not in own]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{k}=...' for k in missing)}; {USAGE}")
    return own, overrides


def main(argv: Sequence[str] | None = None) -> Path:
    with user_errors():
        own, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        checkpoint = api.resolve_checkpoint(own["checkpoint"])
        overrides = [*overrides, "model.masked_attn=false"]
        cfg = compose_for(overrides, own["checkpoint"])  # a run directory's or Transformers' own config
        metadata = build_metadata(cfg, checkpoint, own.get("input_dtype", "float32"))
        model = api.load_model(cfg.model, checkpoint)
        out = export(model, metadata, own["out"], own.get("format"))
        print(f"wrote {out} ({metadata.model_name}, {metadata.task}, input {metadata.img_size}, any batch)")
        return out


if __name__ == "__main__":
    main()
