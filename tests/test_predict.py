"""python -m eomt.predict end to end on a tiny random checkpoint and a folder of images."""

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
from eomt.data.decode import rgb_to_id
from eomt.errors import ConfigError
from eomt.model import build_model
from eomt.predict import main, parse_args

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = ["model=tiny", "dataset=synthetic"]


def save_tiny_checkpoint(folder, task):
    torch.manual_seed(0)
    model = build_model(compose([*OVERRIDES, f"task={task}"]).model)
    path = folder / f"tiny_{task}.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "panoptic")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 40, 3), dtype=np.uint8)).save(root / "sub" / "b.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def run(checkpoint, images, out, *extra):
    return main(
        [f"checkpoint={checkpoint}", f"input={images}", f"output={out}", "device=cpu", *OVERRIDES, *extra]
    )


def test_panoptic_outputs(checkpoint, images, tmp_path):
    # a low threshold so that the random network's queries make segments
    run(checkpoint, images, tmp_path, "batch_size=2", "eval.predictor.panoptic.score_threshold=0.0")
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["a.png", "sub__b.png"]
    with Image.open(tmp_path / "overlays" / "sub__b.png") as overlay:
        assert overlay.size == (40 * 7, 90 * 7) and overlay.mode == "RGB"  # enlarged: labels stay legible
    annotations = json.loads((tmp_path / "panoptic.json").read_text())["annotations"]
    assert sorted(a["file_name"] for a in annotations) == ["a.png", "sub__b.png"]
    for ann in annotations:
        ids = rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic" / ann["file_name"])))
        listed = {s["id"] for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) - {0} == listed
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum()) and 0 <= s["category_id"] < 5
    categories = json.loads((tmp_path / "categories.json").read_text())
    assert [c["name"] for c in categories] == ["disc", "box", "triangle", "sky", "ground"]


def test_semantic_and_instance_outputs(images, tmp_path):
    run(save_tiny_checkpoint(tmp_path, "semantic"), images / "a.png", tmp_path / "sem", "task=semantic")
    semantic = np.asarray(Image.open(tmp_path / "sem" / "semantic" / "a.png"))
    assert semantic.shape == (50, 70) and semantic.max() < 5
    run(
        save_tiny_checkpoint(tmp_path, "instance"),
        images,
        tmp_path / "ins",
        "task=instance",
        "eval.predictor.instance.topk=7",
    )
    results = json.loads((tmp_path / "ins" / "instances.json").read_text())
    assert len(results) == 14 and {r["image_id"] for r in results} == {"a.png", "sub__b.jpg"}
    assert all("bbox" not in r and 0 <= r["category_id"] < 3 for r in results)


def test_argument_errors_are_one_line():
    with pytest.raises(ConfigError, match="missing input=..., output=..."):
        parse_args(["checkpoint=x.pt"])
    with pytest.raises(ConfigError, match="not key=value"):
        parse_args(["checkpoint"])
    args, overrides = parse_args(["checkpoint=c", "input=i", "output=o", "model=vit_s", "batch_size=4"])
    assert args.batch_size == 4 and overrides == ["model=vit_s"]
    with pytest.raises(ConfigError, match="compile=maybe must be true or false"):
        parse_args(["checkpoint=c", "input=i", "output=o", "compile=maybe"])
    with pytest.raises(ConfigError, match="runtime=onnxruntime runs its own file"):
        parse_args(["runtime=onnxruntime", "model_file=m", "input=i", "output=o", "compile=true"])


def test_an_unreadable_image_is_skipped_named_and_counted(checkpoint, images, tmp_path, caplog, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes((images / "a.png").read_bytes())
    (folder / "broken.jpg").write_bytes((images / "sub" / "b.jpg").read_bytes()[:40])  # truncated
    with caplog.at_level("WARNING", logger="eomt.predict"):
        run(checkpoint, folder, tmp_path / "out")
    assert "skipping unreadable image" in caplog.text and "broken.jpg" in caplog.text
    assert "wrote 1 predictions (panoptic)" in (out := capsys.readouterr().out)
    assert "skipped 1 unreadable" in out
    panoptic = json.loads((tmp_path / "out" / "panoptic.json").read_text())  # complete, valid JSON
    assert [a["file_name"] for a in panoptic["annotations"]] == ["a.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["a.png"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00" * 4096, "is unreadable or not a PyTorch checkpoint"),
        (None, "contains Python objects that weights-only loading refuses"),
    ],
)
def test_an_unusable_checkpoint_is_one_line_and_exit_1(images, tmp_path, content, message):
    bad = tmp_path / "bad.pt"
    if content is None:
        torch.save({"model": {}, "note": Path("a python object")}, bad)
    else:
        bad.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "eomt.predict", f"checkpoint={bad}", f"input={images}", f"output={tmp_path}/o"]
        + OVERRIDES,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad} {message}"), done.stderr


def test_compiled_bf16_predictions_match_eager_bf16(images, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path, "semantic")
    maps = {}
    for name, extra in {"eager": [], "compiled": ["compile=true"]}.items():
        run(checkpoint, images / "a.png", tmp_path / name, "task=semantic", "eval.cpu_precision=bf16", *extra)
        maps[name] = np.asarray(Image.open(tmp_path / name / "semantic" / "a.png"))
    assert maps["compiled"].shape == (50, 70)
    assert (maps["compiled"] == maps["eager"]).mean() > 0.99
    with pytest.raises(ConfigError, match="eval.cpu_precision=fp16 is not one of fp32|bf16"):
        run(checkpoint, images / "a.png", tmp_path / "x", "task=semantic", "eval.cpu_precision=fp16")
