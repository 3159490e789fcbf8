"""eomt.export to ONNX and .pt2, run back through ONNX Runtime / torch.export and the predictors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eomt.config import compose
from eomt.errors import ConfigError, MissingPackage, require
from eomt.export import config_hash, export, main
from eomt.export_metadata import ExportMetadata
from eomt.inference import PanopticPredictor, SemanticPredictor
from eomt.inference.runtime import OnnxRuntimeNetwork, OpenVinoNetwork, TorchExportNetwork
from eomt.model import EoMT, build_model
from eomt.predict import main as predict

pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")  # CI installs it (make test)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["model=tiny", "dataset=synthetic"]
TOLERANCE = 1e-4  # fp32 logits, ONNX Runtime vs PyTorch eager


def metadata(model: EoMT, task: str = "panoptic", num_classes: int = 5, input_dtype: str = "float32"):
    return ExportMetadata(
        task=task,
        class_names=[f"c{i}" for i in range(num_classes)],
        thing_classes=[0, 1],
        stuff_classes=list(range(2, num_classes)),
        img_size=list(model.img_size),
        input_dtype=input_dtype,
        backbone="test",
        model_name="test",
        config_hash="0",
        config_source="export",
    )


def eager(model: EoMT, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mask_logits, class_logits = model(images)
    return mask_logits[-1], class_logits[-1]


def assert_close(network, model: EoMT, batch: int = 3) -> None:
    torch.manual_seed(1)
    images = torch.rand(batch, 3, *model.img_size)
    (got_masks,), (got_classes,) = network(images)
    want_masks, want_classes = eager(model, images)
    assert got_masks.shape == want_masks.shape and got_classes.shape == want_classes.shape
    assert (got_masks - want_masks).abs().max() <= TOLERANCE
    assert (got_classes - want_classes).abs().max() <= TOLERANCE


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo network's checkpoint, exported once to each format by the command line."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    cfg = compose([*DEMO, "model.masked_attn=false"])
    model = build_model(cfg.model).eval()
    run_config = {"name": "demo", "seed": 0}
    torch.save({"model": model.state_dict(), "config": run_config}, folder / "demo.pt")
    for suffix in ("onnx", "pt2"):
        main([f"checkpoint={folder / 'demo.pt'}", f"out={folder / f'demo.{suffix}'}", *DEMO])
    return folder, model, run_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 40, 3), dtype=np.uint8)).save(root / "b.png")
    return root


def test_demo_files_carry_metadata_and_match_eager(demo):
    folder, model, run_config = demo
    cfg = compose(DEMO)
    networks = [OnnxRuntimeNetwork(folder / "demo.onnx"), OpenVinoNetwork(folder / "demo.onnx")]
    for network in [*networks, TorchExportNetwork(folder / "demo.pt2")]:
        meta = network.metadata
        assert meta.task == "panoptic" and meta.class_names == list(cfg.dataset.class_names)
        assert meta.thing_classes == [0, 1, 2] and meta.stuff_classes == [3, 4]
        assert meta.img_size == [64, 64] and meta.backbone == cfg.model.backbone
        assert meta.config_source == "checkpoint"
        assert meta.config_hash == config_hash(run_config)
        assert_close(network, model, batch=3)  # exported with batch 2: the batch is dynamic
        assert_close(network, model, batch=1)


def test_onnx_vit_s_non_square_and_dinov3_rope(tmp_path, make_tiny_eomt):
    """ViT-S (DINOv2, real width and depth) at a small non-square size, and a DINOv3 rope backbone."""
    torch.manual_seed(0)
    vit_s = EoMT("vit_small_patch14_reg4_dinov2", img_size=(48, 80), num_classes=5, num_queries=10)
    dinov3 = make_tiny_eomt("dinov3", img_size=(64, 32))
    for name, model in (("vit_s", vit_s), ("dinov3", dinov3)):
        model.masked_attn = False
        model.eval()
        path = export(model, metadata(model), tmp_path / f"{name}.onnx")
        assert_close(OnnxRuntimeNetwork(path), model)
        assert_close(OpenVinoNetwork(path), model)


def test_predictors_give_identical_maps(demo):
    folder, model, _ = demo
    rng = np.random.default_rng(0)
    images = [
        torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)) for h, w in ((50, 70), (90, 40))
    ]
    panoptic = PanopticPredictor(thing_classes=[0, 1, 2], score_threshold=0.0)
    onnx = OnnxRuntimeNetwork(folder / "demo.onnx")
    for got, want in zip(panoptic(onnx, images), panoptic(model, images), strict=True):
        assert torch.equal(got["id_map"], want["id_map"])
        assert [s["category_id"] for s in got["segments"]] == [s["category_id"] for s in want["segments"]]

    semantic = SemanticPredictor()  # sliding windows: several windows per image in one batch
    for got, want in zip(semantic(onnx, images), semantic(model, images), strict=True):
        assert torch.equal(got["semantic"], want["semantic"])


def test_uint8_input_is_normalised_inside_the_graph(tmp_path, make_tiny_eomt):
    model = make_tiny_eomt(masked_attn=False).eval()
    path = export(model, metadata(model, input_dtype="uint8"), tmp_path / "uint8.pt2")
    network = TorchExportNetwork(path)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    got_masks, got_classes = network.program(images)
    want_masks, want_classes = eager(model, images.float() / 255)
    assert (got_masks - want_masks).abs().max() <= TOLERANCE
    assert (got_classes - want_classes).abs().max() <= TOLERANCE


def test_predict_onnxruntime_and_openvino_write_the_same_maps_as_pytorch(demo, images, tmp_path):
    folder, _, _ = demo
    low = "eval.predictor.panoptic.score_threshold=0.0"  # the random network's queries make segments
    common = [f"input={images}", "device=cpu", low]
    predict([f"checkpoint={folder / 'demo.pt'}", f"output={tmp_path / 'torch'}", *common, *DEMO])
    for runtime in ("onnxruntime", "openvino"):
        # no model=/dataset=: the file's metadata names the task and the classes
        out = tmp_path / runtime
        predict([f"runtime={runtime}", f"model_file={folder / 'demo.onnx'}", f"output={out}", *common])
        for name in ("a.png", "b.png"):
            with (
                Image.open(tmp_path / "torch" / "panoptic" / name) as want,
                Image.open(out / "panoptic" / name) as got,
            ):
                assert np.array_equal(np.asarray(got), np.asarray(want))
        categories = json.loads((out / "categories.json").read_text())
        assert categories == json.loads((tmp_path / "torch" / "categories.json").read_text())


def test_openvino_bf16_where_the_cpu_has_it_and_a_clear_line_where_not(demo):
    folder, model, _ = demo
    import openvino

    with pytest.raises(ConfigError, match="runtime=openvino runs on the CPU, not device=cuda"):
        OpenVinoNetwork(folder / "demo.onnx", "cuda")

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ConfigError, match="this CPU has no native bf16"):
            OpenVinoNetwork(folder / "demo.onnx", precision="bf16")
        return
    network = OpenVinoNetwork(folder / "demo.onnx", precision="bf16")
    assert network.compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16
    images = torch.rand(2, 3, *model.img_size)
    (got_masks,), (got_classes,) = network(images)
    want_masks, want_classes = eager(model, images)
    assert 0 < (got_masks - want_masks).abs().max() < 0.1  # bf16, not fp32: close, not equal
    assert (got_classes - want_classes).abs().max() < 0.1


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch-export"])
def test_a_damaged_or_wrong_model_file_is_one_line(demo, images, tmp_path, runtime):
    folder, _, _ = demo
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes((folder / "demo.onnx").read_bytes()[:3000])
    for path in (damaged, folder / "demo.pt"):  # cut short; a checkpoint, not an exported file
        args = [f"runtime={runtime}", f"model_file={path}", f"input={images}", f"output={tmp_path}"]
        with pytest.raises(ConfigError, match=f"model_file={path} is not a readable .* file") as error:
            predict(args)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset=coco"], "differ from the dataset config's 133"),
        (["dataset=synthetic", "task=semantic"], "is a panoptic model but task=semantic"),
        (["eval.cpu_precision=bf16"], "runtime=onnxruntime runs the exported file in its own precision"),
    ],
)
def test_predict_rejects_a_file_of_other_classes_task_or_precision(
    demo, images, tmp_path, overrides, message
):
    folder, _, _ = demo
    args = [
        "runtime=onnxruntime",
        f"model_file={folder / 'demo.onnx'}",
        f"input={images}",
        f"output={tmp_path}",
    ]
    with pytest.raises(ConfigError, match=message) as error:
        predict([*args, *overrides])
    assert "\n" not in str(error.value)


def test_missing_optional_package_says_what_to_install():
    with pytest.raises(MissingPackage, match=r"pip install -e '\.\[export\]'"):
        require("eomt_no_such_package", "ONNX export")


def test_masked_attention_network_is_refused(tmp_path, make_tiny_eomt):
    model = make_tiny_eomt()
    with pytest.raises(ConfigError, match="model.masked_attn=false"):
        export(model, metadata(model), tmp_path / "x.onnx")


def test_forward_bench_times_runtimes_each_at_its_own_precision(tmp_path):
    args = ["model=tiny", "model.img_size=[32,32]", "--device", "cpu", "--rounds", "1", "--iters", "1"]
    args += ["--warmup", "0", "--runtime", "torch,torch@bf16,openvino", "--json", str(tmp_path / "t.json")]
    done = subprocess.run(
        [sys.executable, "bench/forward.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split()[0] for line in done.stdout.splitlines() if "images/s" in line]
    assert rows == ["torch", "torch@bf16", "openvino"]
    record = json.loads((tmp_path / "t.json").read_text())  # the first runtime's
    assert (record["runtime"], record["dtype"], record["img_size"]) == ("torch", "fp32", [32, 32])
    assert record["gflops"] > 0 and record["images_per_s"] > 0
