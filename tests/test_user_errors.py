"""Every entry point turns a user's mistake into one line on stderr and exit code 1, no traceback.

The damaged files are made here: a truncated zip, a missing panoptic PNG, an unknown category id,
checkpoints of garbage bytes. The entry points run in subprocesses, as a person runs them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from eomt.config import compose
from eomt.data.synthetic import ensure_generated
from eomt.errors import ConfigError, DataError, user_errors
from eomt.model import build_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ["dataset=synthetic", "dataset.generator.num_train=2", "dataset.generator.num_val=2"]


def run_entry(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line(done: subprocess.CompletedProcess, *parts: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr  # first line == last line
    for part in parts:
        assert part in lines[0]
    return lines[0]


def test_user_errors_unwraps_hydras_instantiate_and_keeps_programming_errors(capsys):
    from hydra.errors import InstantiationException

    with pytest.raises(SystemExit) as exit_info, user_errors():
        try:
            raise DataError("data.zip is not a readable zip archive")
        except DataError as e:
            raise InstantiationException("Error in call to target 'x':\nDataError(...)") from e
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: data.zip is not a readable zip archive\n"
    with pytest.raises(KeyError), user_errors():
        raise KeyError("a bug keeps its traceback")
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise KeyboardInterrupt  # Ctrl-C where no handler of the work's own saves anything
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted (Ctrl-C)\n"
    with pytest.raises(SystemExit), user_errors():
        raise ConfigError("bad value")


def _rewrite_zip(path: Path, change) -> None:
    """Rewrite the zip at `path`, passing each (name, bytes) through `change` (None drops it)."""
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                dst.writestr(name, data)


def _drop_first_png(name: str, data: bytes) -> bytes:
    if not name.endswith("panoptic_val2017.zip"):
        return data
    inner = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(inner, "w") as dst:
        for info in src.infolist()[1:]:
            dst.writestr(info, src.read(info))
    return inner.getvalue()


def _unknown_category(name: str, data: bytes) -> bytes:
    if not name.endswith("panoptic_val2017.json"):
        return data
    annotations = json.loads(data)
    annotations["annotations"][0]["segments_info"][0]["category_id"] = 999
    return json.dumps(annotations).encode()


DAMAGE = {
    "truncated zip": (
        lambda folder: (folder / "val2017.zip").write_bytes((folder / "val2017.zip").read_bytes()[:300]),
        ["val2017.zip is not a readable zip archive", "download it again"],
    ),
    "missing panoptic PNG": (
        lambda folder: _rewrite_zip(folder / "panoptic_annotations_trainval2017.zip", _drop_first_png),
        ["missing from", "panoptic_val2017.zip"],
    ),
    "unknown category id": (
        lambda folder: _rewrite_zip(folder / "panoptic_annotations_trainval2017.zip", _unknown_category),
        ["category ids [999]", "panoptic_val2017.json"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_evaluate_py_names_the_damaged_data_file(tmp_path, case):
    cache = tmp_path / "cache"
    folder = ensure_generated(cache / "synthetic", "coco", 2, 2, (64, 64))
    damage, parts = DAMAGE[case]
    damage(folder)
    checkpoint = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    torch.save({"model": build_model(compose(["model=tiny", *DATA]).model).state_dict()}, checkpoint)
    done = run_entry(
        [
            "evaluate.py",
            "model=tiny",
            *DATA,
            f"checkpoint={checkpoint}",
            "trainer.device=cpu",
            "eval.num_workers=0",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        env={"EOMT_CACHE": str(cache)},
    )
    assert_one_line(done, *parts)


@pytest.mark.slow
def test_export_hf_with_an_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(range(256)) * 8)
    done = run_entry(
        ["-m", "eomt.export_hf", "--checkpoint", str(bad), "--out", str(tmp_path / "hf"), "model=tiny"]
    )
    assert_one_line(done, f"{bad} is unreadable or not a PyTorch checkpoint")


@pytest.mark.slow
def test_report_synthetic_and_a_bench_script(tmp_path):
    assert_one_line(run_entry(["-m", "eomt.report", str(tmp_path / "nope")]), "does not exist")
    assert_one_line(
        run_entry(["-m", "eomt.data.synthetic", "--layout", "coco", "--out", str(tmp_path), "--size", "8x8"]),
        "too small",
    )
    folder = ensure_generated(tmp_path / "bench", "coco", 2, 1, (480, 640), seed=0)  # bench/loader.py's cache
    (folder / "train2017.zip").write_bytes(b"")
    done = run_entry(
        ["bench/loader.py", "--images", "2", "--workers", "0", "--data", str(tmp_path / "bench")]
    )
    assert_one_line(done, "train2017.zip is not a readable zip archive")


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.py", "model=vit_x"], "model=vit_x is not in conf/model/: use one of "),
        (  # an optional group: Hydra alone would train the default network in silence
            ["train.py", "experiment=coco_panoptic_vit_l_64"],
            "experiment=coco_panoptic_vit_l_64 is not in conf/experiment/: use one of ",
        ),
        (["train.py", "trainer.lr_typo=1"], "trainer.lr_typo is not a config key: check its spelling"),
        (
            ["evaluate.py", "checkpoint=x.pt", "dataset=kitti"],
            "dataset=kitti is not in conf/dataset/: use one of",
        ),
    ],
)
def test_a_bad_override_of_a_hydra_app_is_one_line(args, message):
    assert_one_line(run_entry(args), message)
