"""The package works outside the checkout: a built wheel, installed into a fresh virtualenv, runs
`python -m eomt.predict` and `eomt.api.load` from a folder that has no conf/ and no source tree."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eomt.config import compose
from eomt.model import build_model

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model=tiny", "dataset=synthetic"]


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the sources (a build in place would leave build/ in the checkout)."""
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "local")
    for name in ("eomt", "hydra_plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
        check=True,
        timeout=300,
    )
    return next(out.glob("eomt-*.whl"))


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A virtualenv holding only the wheel; the dependencies come from this interpreter's site-packages
    (plain paths in a .pth file: the editable install's finder there is not run), so it works offline."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(own, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "-q",
            "install",
            "--no-deps",
            "--no-index",
            "--target",
            own,
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    return python


@pytest.mark.slow
def test_an_installed_wheel_predicts_and_loads_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    assert "eomt/conf/train.yaml" in zipfile.ZipFile(wheel).namelist()
    python = fresh_venv(tmp_path / "venv", wheel)

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"model": build_model(compose(OVERRIDES).model).state_dict()}, checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
        images / "a.png"
    )
    outside = tmp_path / "elsewhere"  # no conf/, no eomt/ source here
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(python), *args], cwd=outside, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    load = (
        "import eomt, eomt.api; "
        f"net = eomt.api.load({OVERRIDES!r}, checkpoint={str(checkpoint)!r}); "
        "print(eomt.__file__); print(type(net).__name__, net.training)"
    )
    where, loaded = run("-c", load).splitlines()[-2:]
    assert Path(where).is_relative_to(tmp_path / "venv"), where  # the installed copy, not the checkout
    assert loaded == "EoMT False"

    run(
        "-m",
        "eomt.predict",
        f"checkpoint={checkpoint}",
        f"input={images}",
        "output=out",
        "device=cpu",
        *OVERRIDES,
    )
    assert (outside / "out" / "overlays" / "a.png").is_file()
    assert (outside / "out" / "panoptic" / "a.png").is_file()
