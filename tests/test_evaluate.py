"""evaluate.py end to end: every dataset x task on generated zips, and each checkpoint kind."""

import json

import pytest
import torch
from conftest import authors_release_state
from PIL import Image

import evaluate
import train
from eomt.config import compose
from eomt.data.synthetic import generate
from eomt.errors import CheckpointError, ConfigError
from eomt.export_hf import export_hf
from eomt.model import build_model

FAST_EVAL = ["eval.num_workers=0", "eval.batch_size=2", "trainer.device=cpu", "eval.num_overlays=2"]


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EOMT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_evaluate(out_dir, *overrides):
    cfg = compose([*FAST_EVAL, *overrides], config_name="evaluate")
    return evaluate.evaluate_checkpoint(cfg, out_dir), json.loads((out_dir / "metrics.json").read_text())


def save_ours(model, path):
    torch.save({"model": model.state_dict()}, path)
    return path


def tiny_model(*overrides):
    torch.manual_seed(0)
    return build_model(compose(["model=tiny", "model.pretrained=false", *overrides]).model)


LAYOUTS = {  # dataset config -> (generator layout, [tasks])
    "ade20k": ("ade20k", ["semantic", "panoptic"]),
    "cityscapes": ("cityscapes", ["semantic", "panoptic", "instance"]),
}
HEADLINE = {"panoptic": "PQ", "semantic": "mIoU", "instance": "AP"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, task",
    [("synthetic", t) for t in ("panoptic", "semantic", "instance")]
    + [(d, t) for d, (_, tasks) in LAYOUTS.items() for t in tasks],
)
def test_every_dataset_and_task_evaluates(tmp_path_factory, dataset, task):
    overrides = [f"dataset={dataset}", f"task={task}", "model=tiny", "dataset.crop_size=[64,64]"]
    if dataset in LAYOUTS:
        root = tmp_path_factory.getbasetemp() / f"data_{dataset}"
        if not root.exists():
            generate(LAYOUTS[dataset][0], root, num_train=1, num_val=2, size=(64, 128), seed=0)
        overrides.append(f"dataset.root={root}")
    checkpoint = save_ours(tiny_model(*overrides), tmp_path_factory.mktemp("ckpt") / "model.pt")
    out = tmp_path_factory.mktemp("eval")
    metrics, record = run_evaluate(
        out,
        *overrides,
        f"checkpoint={checkpoint}",
        "eval.write_predictions=true",
        "eval.predictor.panoptic.score_threshold=0.0",
    )
    headline = HEADLINE[task]
    assert 0.0 <= record["metrics"][headline] <= 100.0
    assert record["task"] == task and record["gflops"] > 0 and record["fps"] > 0
    assert record["fps_device"] == "cpu" and isinstance(record["fps_under_load"], bool)  # timed alone?
    assert 0.0 <= record["fps_other_load"] <= 1.0 and 0.0 <= record["fps_idle"] <= 1.0
    assert len(list((out / "overlays").glob("*.png"))) == 2
    predictions = out / "predictions"
    expected = {"panoptic": "panoptic.json", "instance": "instances.json", "semantic": "semantic"}[task]
    assert (predictions / expected).exists()


def test_trained_demo_checkpoint_evaluates_from_its_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    trained = train.build_run(
        compose(["experiment=demo", "trainer.max_steps=2", "trainer.num_workers=0", "eval.every_epochs=0"]),
        run_dir,
    )
    train.train(trained)
    metrics, record = run_evaluate(tmp_path / "eval", "experiment=demo", f"checkpoint={run_dir}")
    assert record["step"] is None and "PQ" in record["metrics"]
    assert set(metrics) >= {"All", "Things", "Stuff"}


def test_authors_and_transformers_checkpoints_score_like_ours(tmp_path):
    model = tiny_model("dataset=synthetic", "dataset.crop_size=[64,64]")
    with torch.no_grad():  # confident queries, so that the panoptic rule keeps some
        model.class_head.bias[:-1] += 4.0
    ours = save_ours(model, tmp_path / "ours.pt")
    authors = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": authors_release_state(model)}, authors)
    hf_dir = export_hf(model, tmp_path / "hf")
    common = ["experiment=demo", "model.masked_attn=false"]
    results = [
        run_evaluate(tmp_path / name, *common, f"checkpoint={path}")[1]["metrics"]
        for name, path in (("ours", ours), ("authors", authors), ("hf", hf_dir))
    ]
    assert results[0] == pytest.approx(results[1]) and results[0] == pytest.approx(results[2], abs=1e-3)


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint=.*nope.pt does not exist"):
        run_evaluate(tmp_path, "experiment=demo", f"checkpoint={tmp_path / 'nope.pt'}")


def test_overlays_are_viewable_pngs(tmp_path):
    ckpt = save_ours(tiny_model("dataset=synthetic", "dataset.crop_size=[64,64]"), tmp_path / "m.pt")
    run_evaluate(tmp_path / "out", "experiment=demo", f"checkpoint={ckpt}")
    overlay = next((tmp_path / "out" / "overlays").glob("*.png"))
    with Image.open(overlay) as image:
        assert image.mode == "RGB" and image.width > 64


def test_class_names_from_the_data_json(tmp_path):
    """`dataset.panoptic.class_names=null`: the names come from the annotations, as for one's own data."""
    ckpt = save_ours(tiny_model("dataset=synthetic", "dataset.crop_size=[64,64]"), tmp_path / "m.pt")
    for overlays in (0, 1):
        out = tmp_path / f"out{overlays}"
        _, record = run_evaluate(
            out,
            "experiment=demo",
            f"checkpoint={ckpt}",
            "dataset.panoptic.class_names=null",
            f"eval.num_overlays={overlays}",
        )
        assert "PQ" in record["metrics"]
        assert len(list((out / "overlays").glob("*.png")) if overlays else []) == overlays


def test_an_exported_file_scores_as_its_checkpoint(tmp_path):
    pytest.importorskip("openvino", reason="pip install -e '.[export]'")  # CI installs it (make test)
    from eomt.export import main as export

    model = tiny_model("dataset=synthetic", "dataset.crop_size=[64,64]", "model.masked_attn=false")
    ckpt = save_ours(model, tmp_path / "m.pt")
    onnx_file = export([f"checkpoint={ckpt}", f"out={tmp_path / 'm.onnx'}", "experiment=demo"])
    common = ["experiment=demo", "model.masked_attn=false"]
    _, want = run_evaluate(tmp_path / "torch", *common, f"checkpoint={ckpt}")
    _, got = run_evaluate(tmp_path / "ov", *common, "runtime=openvino", f"model_file={onnx_file}")
    assert got["metrics"] == pytest.approx(want["metrics"]) and got["params"] is None and got["fps"] > 0
    with pytest.raises(ConfigError, match="runtime=openvino scores an exported file: add model_file="):
        run_evaluate(tmp_path / "x", *common, "runtime=openvino")
    with pytest.raises(ConfigError, match="checkpoint=... is missing"):
        run_evaluate(tmp_path / "x", *common)
