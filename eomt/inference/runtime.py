"""Exported networks (eomt.export) behind the network contract the predictors use.

A runtime network maps images float (B,3,H,W) in [0,1] to ([mask_logits (B,Q,H/4,W/4)],
[class_logits (B,Q,C+1)]) and has `img_size` and `metadata` (`eomt.export_metadata.ExportMetadata`), so the
predictors run it exactly like the PyTorch EoMT: same letterbox / sliding windows, same post-processing.

- `onnxruntime`: an .onnx file in ONNX Runtime, on the CUDA execution provider (device=cuda, or device=auto
  when this onnxruntime has it), else on the CPU; results come back as CPU tensors, post-processed there.
- `openvino`: an .onnx file in OpenVINO on the CPU, at fp32 or, with precision bf16 (`eval.cpu_precision=bf16`)
  on a CPU with native bf16 (AVX512-BF16 or AMX), at bf16: the fastest CPU runtime (README, Deploying).
- `torch-export`: a .pt2 file (torch.export) as a PyTorch module, on the requested device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from eomt.errors import ConfigError, UserError, require
from eomt.export_metadata import PT2_METADATA_FILE, ExportMetadata

# ONNX Runtime graph optimisation levels by name (bench/forward.py --ort-opt).
ORT_OPTIMIZATION = {"disable": 0, "basic": 1, "extended": 2, "all": 99}


def _as_images(images: Tensor, input_dtype: str) -> Tensor:
    if input_dtype == "uint8":
        return (images * 255).round().clamp(0, 255).to(torch.uint8)
    return images.float()


class OnnxRuntimeNetwork(nn.Module):
    """An .onnx file in an ONNX Runtime session."""

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
    ):
        super().__init__()
        ort = require("onnxruntime", "runtime=onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel(ORT_OPTIMIZATION[optimization])
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "auto":
            device = "cuda" if has_cuda else "cpu"
        if torch.device(device).type == "cuda":
            if not has_cuda:
                raise ConfigError(
                    "device=cuda but this onnxruntime has no CUDA execution provider: "
                    "pip install onnxruntime-gpu, or device=cpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.metadata = ExportMetadata.from_strings(self.session.get_modelmeta().custom_metadata_map, path)
        self.img_size = tuple(self.metadata.img_size)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feed = {"images": np.ascontiguousarray(_as_images(images, self.metadata.input_dtype).cpu().numpy())}
        mask_logits, class_logits = self.session.run(["mask_logits", "class_logits"], feed)
        return [torch.from_numpy(mask_logits)], [torch.from_numpy(class_logits)]


class OpenVinoNetwork(nn.Module):
    """An .onnx file compiled by OpenVINO for the CPU, at `precision` fp32 | bf16."""

    PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        precision: str = "fp32",
    ):
        super().__init__()
        ov = require("openvino", "runtime=openvino")
        onnx = require("onnx", "runtime=openvino")
        if device != "auto" and torch.device(device).type != "cpu":
            raise ConfigError(f"runtime=openvino runs on the CPU, not device={device}: use device=cpu")
        if precision not in self.PRECISION_HINTS:
            raise ConfigError(f"runtime=openvino runs at fp32|bf16, not {precision}")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ConfigError("this CPU has no native bf16 (AVX512-BF16 or AMX): use eval.cpu_precision=fp32")
        props = onnx.load(str(path), load_external_data=False).metadata_props
        self.metadata = ExportMetadata.from_strings({p.key: p.value for p in props}, path)
        self.img_size = tuple(self.metadata.img_size)
        config = {"INFERENCE_PRECISION_HINT": self.PRECISION_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feed = np.ascontiguousarray(_as_images(images, self.metadata.input_dtype).cpu().numpy())
        outputs = self.request.infer({"images": feed})
        mask_logits, class_logits = (
            outputs[self.compiled.output(n)] for n in ("mask_logits", "class_logits")
        )
        return [torch.from_numpy(mask_logits.copy())], [torch.from_numpy(class_logits.copy())]


class TorchExportNetwork(nn.Module):
    """A .pt2 file (torch.export) as a module."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        super().__init__()
        extra = {PT2_METADATA_FILE: ""}
        quiet = logging.getLogger("torch.export")  # it logs a traceback for a file it then fails to read
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.program = torch.export.load(str(path), extra_files=extra).module().to(device)
        finally:
            quiet.setLevel(level)
        if not extra[PT2_METADATA_FILE]:
            raise ConfigError(f"{path} has no EoMT metadata: export it with python -m eomt.export")
        self.metadata = ExportMetadata(**json.loads(extra[PT2_METADATA_FILE]))
        self.img_size = tuple(self.metadata.img_size)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        mask_logits, class_logits = self.program(_as_images(images, self.metadata.input_dtype))
        return [mask_logits], [class_logits]


RUNTIMES = {
    "onnxruntime": OnnxRuntimeNetwork,
    "openvino": OpenVinoNetwork,
    "torch-export": TorchExportNetwork,
}


def load_exported(
    runtime: str, path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32"
) -> nn.Module:
    """The exported file at `path` in `runtime` (onnxruntime | openvino | torch-export); device "auto": CUDA
    if usable; `precision` bf16 only for openvino (the others run the file as it is)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime} is not one of torch|{'|'.join(RUNTIMES)}")
    if not Path(path).is_file():
        raise ConfigError(f"model_file={path} does not exist: export one with python -m eomt.export")
    if runtime != "openvino" and precision != "fp32":
        raise ConfigError(
            f"eval.cpu_precision={precision} applies to runtime=torch|openvino; "
            f"runtime={runtime} runs the exported file in its own precision"
        )
    if device == "auto" and runtime == "torch-export":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if runtime == "openvino":
            return OpenVinoNetwork(path, device, precision=precision)
        return RUNTIMES[runtime](path, device)
    except UserError:
        raise
    except Exception as e:  # the runtimes' own parse errors (protobuf, zip, ...)
        kind = ".pt2 (torch.export)" if runtime == "torch-export" else "ONNX"
        raise ConfigError(
            f"model_file={path} is not a readable {kind} file ({type(e).__name__}): "
            "export it again with python -m eomt.export"
        ) from e
