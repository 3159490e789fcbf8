"""Offline, a pretrained backbone that is not cached is one quick line naming the weights and the way on."""

import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from eomt import api
from eomt.errors import ConfigError
from eomt.model.pretrained import check_pretrained_reachable

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vit_small_patch14_reg4_dinov2"
HUB_REPO = "timm/vit_small_patch14_reg4_dinov2.lvd142m"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_missing_pretrained_weights_offline_are_one_line(empty_cache):
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        api.load(["model=vit_s", "model.img_size=[64,64]"])
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "\n" not in message
    for part in (BACKBONE, HUB_REPO, "HF_HUB_OFFLINE=1", "model.pretrained_file=", "model.pretrained=false"):
        assert part in message


def test_cached_pretrained_weights_pass_the_check(empty_cache):
    with pytest.raises(ConfigError):
        check_pretrained_reachable(BACKBONE)
    repo = empty_cache / f"models--{HUB_REPO.replace('/', '--')}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    check_pretrained_reachable(BACKBONE)  # found in the cache: timm loads it from there


@pytest.mark.slow
def test_readme_smoke_command_offline_fails_in_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "train.py", "dataset=synthetic", f"dataset.root={tmp_path / 'data'}", "model=vit_s",
         "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the pretrained weights of") and "model.pretrained=false" in last
    assert "Traceback" not in result.stderr
