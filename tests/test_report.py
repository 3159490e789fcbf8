"""Comparing runs: the sweep report (table + plot) and the TensorBoard HParams records."""

import json
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from eomt import report
from eomt.errors import DataError
from eomt.tb_hparams import flatten_hparams, hparams_from_overrides, log_hparams


def write_run(sweep: Path, name: str, content) -> None:
    run = sweep / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(content if isinstance(content, str) else json.dumps(content))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "annealing_coco_panoptic_vit_l"
    full = {
        "task": "panoptic",
        "dataset": "coco",
        "step": 88692,
        "metrics": {"PQ": 56.0, "PQ_th": 61.5, "SQ": 82.25},
        "fps": 128.0,
        "gflops": 831.4,
        "params": 316_000_000,
        "details": {"per_class": [1.0, 2.0]},
    }
    write_run(root, "0_masked_train_infer", {"task": "panoptic", "metrics": {"PQ": 56.2}, "fps": 61.0})
    write_run(root, "10_annealed", full)
    write_run(root, "2_never_masked", {"task": "panoptic", "metrics": {"PQ": 53.2, "note": "text"}})
    write_run(root, "3_flat", {"PQ": 27.4, "step": 10})  # flat layout
    (root / "3_flat" / "benchmark.json").write_text(json.dumps({"fps": 130.5, "gflops": None}))
    write_run(root, ".submitit/123_0", {"PQ": 99.0})  # launcher internals are not runs
    (root / "4_unfinished").mkdir()  # no metrics.json yet
    return root


def test_find_runs_reads_every_run_in_job_order(sweep):
    runs = report.find_runs(sweep)
    assert [r.name for r in runs] == ["0_masked_train_infer", "2_never_masked", "3_flat", "10_annealed"]
    annealed = runs[-1]
    assert annealed.task == "panoptic" and annealed.primary_metric == "PQ"
    assert annealed.metrics == {"PQ": 56.0, "PQ_th": 61.5, "SQ": 82.25}
    assert (annealed.fps, annealed.gflops, annealed.params) == (128.0, 831.4, 316_000_000)
    assert runs[1].metrics == {"PQ": 53.2} and runs[1].fps is None  # non-numeric entries are skipped
    assert runs[2].metrics == {"PQ": 27.4} and runs[2].task is None and runs[2].primary_metric == "PQ"
    assert (runs[2].fps, runs[2].gflops) == (130.5, None)  # from benchmark.json


def test_markdown_table_has_one_row_per_run_and_dashes_for_missing_values(sweep):
    table = report.markdown_table(report.find_runs(sweep)).splitlines()
    assert table[0] == "| run | task | PQ | PQ_th | SQ | FPS | GFLOPs | params |"
    assert len(table) == 2 + 4
    assert table[2] == "| 0_masked_train_infer | panoptic | 56.20 | - | - | 61.00 | - | - |"
    assert table[5] == "| 10_annealed | panoptic | 56.00 | 61.50 | 82.25 | 128.00 | 831.40 | 316.00M |"


def test_numbers_have_one_format_and_no_negative_zero():
    run = report.RunResult("a", "semantic", {"mIoU": 60.567, "aAcc": 0.0, "loss": -0.001}, fps=0.5)
    row = report.markdown_table([run]).splitlines()[2]
    assert row == "| a | semantic | 60.57 | 0.00 | 0.00 | 0.50 | - | - |"
    labels = [report._tick_label(t) for t in report._nice_ticks(-0.4, 2.1)]
    assert "0" in labels and not any(label in ("-0", "-0.0") for label in labels)


def test_labels_of_nearby_points_do_not_overprint_each_other():
    points = [(400.0, 300.0), (402.0, 301.0), (404.0, 299.0), (880.0, 60.0)]
    sizes = [(150.0, 14.0), (130.0, 14.0), (90.0, 14.0), (120.0, 14.0)]
    bounds = (90.0, 60.0, 920.0, 560.0)
    boxes = report.place_labels(points, sizes, bounds)
    markers = [(x - 6, y - 6, x + 6, y + 6) for x, y in points]
    for i, box in enumerate(boxes):
        assert bounds[0] <= box[0] and box[2] <= bounds[2] and bounds[1] <= box[1] and box[3] <= bounds[3]
        assert (box[2] - box[0], box[3] - box[1]) == sizes[i]
        others = boxes[:i] + boxes[i + 1 :] + markers
        assert all(report._overlap(box, other) == 0 for other in others), i


def test_fps_measured_under_load_is_marked_and_not_plotted(sweep, tmp_path):
    write_run(
        sweep,
        "5_loaded",
        {
            "task": "panoptic",
            "metrics": {"PQ": 50.0},
            "fps": 1.0,
            "fps_device": "cpu",
            "fps_under_load": True,
        },
    )
    write_run(
        sweep, "6_gpu", {"task": "panoptic", "metrics": {"PQ": 51.0}, "fps": 300.0, "fps_device": "H100"}
    )
    runs = report.find_runs(sweep)
    table = report.markdown_table(runs)
    assert "| 5_loaded | panoptic | 50.00 | - | - | 1.00 * | - | - |" in table
    assert table.endswith(report.UNDER_LOAD_NOTE)
    plotted, left_out = report.comparable_speeds(runs)
    assert [r.name for r in plotted] == [
        "0_masked_train_infer",
        "3_flat",
        "10_annealed",
    ]  # the most runs: no device named
    assert [(r.name, why) for r, why in left_out] == [
        ("5_loaded", "measured under load"),
        ("6_gpu", "measured on H100"),
    ]
    table_text, notes = report.summarize(sweep, plot=tmp_path / "plot.png")
    assert "not plotted: 5_loaded (FPS measured under load)" in notes


def test_metric_columns_put_the_task_metrics_first():
    runs = [
        report.RunResult("a", "semantic", {"aAcc": 0.9, "mIoU": 58.4}),
        report.RunResult("b", "instance", {"AP50": 70.0, "AP": 45.2, "AP_small": 20.0}),
    ]
    assert report.metric_columns(runs) == ["mIoU", "AP", "AP50", "AP_small", "aAcc"]
    assert (
        report.markdown_table(runs, ["AP"]).splitlines()[0] == "| run | task | AP | FPS | GFLOPs | params |"
    )


def test_plot_places_each_run_with_fps_on_accuracy_vs_fps(sweep, tmp_path):
    path, metric = report.plot_accuracy_vs_fps(report.find_runs(sweep), tmp_path / "plot.png")
    assert metric == "PQ"
    image = Image.open(path).convert("RGB")
    assert image.size == (960, 640)
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    # three runs report FPS: three point colours, the fourth colour is never used
    plotted = {(0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28), (0x2C, 0xA0, 0x2C)}
    assert plotted <= colours
    assert (0xFF, 0x7F, 0x0E) not in colours


def test_no_plot_without_fps(tmp_path):
    assert (
        report.plot_accuracy_vs_fps([report.RunResult("a", "panoptic", {"PQ": 50.0})], tmp_path / "p.png")
        is None
    )
    assert not (tmp_path / "p.png").exists()


def test_cli_prints_the_table_and_saves_the_plot(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr()
    assert "| 10_annealed | panoptic | 56.00 |" in out.out
    assert (sweep / "accuracy_vs_fps.png").is_file()
    assert "accuracy_vs_fps.png" in out.err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no metrics.json"),
        (lambda root: write_run(root, "0_x", "{not json"), "not valid JSON"),
    ],
)
def test_cli_errors_name_the_problem(tmp_path, setup, message):
    root = tmp_path / "sweep"
    setup(root)
    with pytest.raises(DataError, match=message):
        report.main([str(root), "--no-plot"])


# --- TensorBoard HParams ----------------------------------------------------------------------
def read_hparams(logdir: Path) -> tuple[dict, dict]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = {}
    for key, value in start.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        hparams[key] = getattr(value, kind)
    scalars = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    return hparams, scalars


def test_log_hparams_writes_one_row_into_the_runs_own_event_directory(tmp_path):
    run_tb = tmp_path / "0_masked_train_infer" / "tb"
    writer = SummaryWriter(run_tb)
    writer.add_scalar("train/loss", 1.0, 1)
    log_hparams(
        writer,
        {
            "model": {"num_blocks": 4, "backbone_kwargs": {}},
            "schedule.annealing": False,
            "crop": [640, 640],
            "init_from": None,
            "variant": "masked_train_infer",
        },
        {"final/PQ": 56.2, "final/fps": 61, "final/missing": None, "final/nan": float("nan")},
        step=7,
    )
    writer.close()
    assert [p for p in run_tb.iterdir() if p.is_dir()] == []  # no timestamped sub-run
    hparams, scalars = read_hparams(run_tb)
    assert hparams == {
        "model.num_blocks": 4.0,
        "schedule.annealing": "false",  # not 0.0000
        "crop": "[640, 640]",
        "init_from": "None",
        "variant": "masked_train_infer",
    }
    assert scalars["final/PQ"] == pytest.approx(56.2) and scalars["final/fps"] == 61.0
    assert "final/missing" not in scalars and "final/nan" not in scalars
    assert scalars["train/loss"] == 1.0


def test_log_hparams_accepts_a_directory(tmp_path):
    log_hparams(tmp_path, {"seed": 1}, {"final/mIoU": 58.4})
    hparams, scalars = read_hparams(tmp_path)
    assert hparams == {"seed": 1.0} and scalars == {"final/mIoU": pytest.approx(58.4)}


def test_hparams_from_overrides_keeps_types():
    got = hparams_from_overrides(
        [
            "model.num_blocks=2",
            "+sweep=annealing",
            "schedule.layer_decay=1.0",
            "eval.masked_attn=false",
            "dataset.crop_size=[640,640]",
            "junk",
        ]
    )
    assert got == {
        "model.num_blocks": 2,
        "sweep": "annealing",
        "schedule.layer_decay": 1.0,
        "eval.masked_attn": False,
        "dataset.crop_size": "[640,640]",
    }
    assert flatten_hparams({"a": {"b": {"c": 1}}, "d": (1, 2)}) == {"a.b.c": 1, "d": "(1, 2)"}
