"""Released models by name: a local cache in huggingface_hub's own layout, read offline."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import authors_release_state
from omegaconf import OmegaConf

from eomt import api, model_zoo
from eomt.config import CONF_DIR, compose
from eomt.errors import CheckpointError
from eomt.export_hf import export_hf
from eomt.model import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = ["experiment=demo"]


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """What `hf download` leaves: blobs by hash, a snapshot of links to them, refs/main -> the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / revision), repo / "snapshots" / revision / name)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline hub cache; huggingface_hub reads its settings at import, hence the constants."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def demo_model():
    torch.manual_seed(0)
    cfg = compose([*DEMO, "model.pretrained=false"])
    return build_model(cfg.model)


def assert_same_weights(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, msg=key)


def test_released_name_loads_from_the_cache_with_its_preset(hub_cache, demo_model, tmp_path, monkeypatch):
    release = model_zoo.Release("tiny_demo", tuple(DEMO), "PQ", 0.0, "-")
    monkeypatch.setitem(model_zoo.RELEASES, release.repo_id, release)
    weights = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": authors_release_state(demo_model)}, weights)  # the authors' format
    cache_repo(hub_cache, "tue-mps/tiny_demo", {"pytorch_model.bin": weights})

    loaded = api.load(checkpoint="tue-mps/tiny_demo")  # no overrides: the preset builds the demo network
    assert_same_weights(demo_model, loaded)


def test_transformers_repo_loads_from_the_cache(hub_cache, demo_model, tmp_path):
    hf_dir = export_hf(demo_model, tmp_path / "hf")
    cache_repo(hub_cache, "someone/eomt-tiny", {p.name: p for p in hf_dir.iterdir()})

    assert_same_weights(demo_model, api.load(DEMO, checkpoint="hf://someone/eomt-tiny"))
    # no overrides: the repo's config.json builds the network
    assert_same_weights(demo_model, api.load(checkpoint="hf://someone/eomt-tiny"))


def test_preset_is_chosen_from_the_name_unless_an_experiment_is_given():
    args = ["dataset.root=/data/coco", "checkpoint=tue-mps/coco_panoptic_eomt_large_640"]
    assert model_zoo.with_preset(args) == [args[0], "experiment=coco_panoptic_vit_l_640", args[1]]
    dinov3 = model_zoo.with_preset(["model=dinov3_vit_l"], "tue-mps/coco_instance_eomt_large_1280_dinov3")
    assert dinov3 == ["experiment=coco_instance_vit_l_1280", "model=dinov3_vit_l"]
    for unchanged in (
        ["experiment=demo", args[1]],
        ["checkpoint=hf://someone/eomt-tiny"],
        ["checkpoint=a.pt"],
    ):
        assert model_zoo.with_preset(unchanged) == unchanged


def test_every_release_names_a_preset_of_its_dataset_and_task():
    """Read from the preset files (composing all of them is slow): dataset, task and backbone family."""
    for release in model_zoo.RELEASES.values():
        overrides = dict(o.split("=") for o in release.preset)
        experiment = OmegaConf.load(CONF_DIR / "experiment" / f"{overrides['experiment']}.yaml")
        groups = {k.removeprefix("override /"): v for d in experiment.defaults for k, v in d.items()}
        groups.update({k: v for k, v in overrides.items() if k != "experiment"})
        dataset = "ade" if groups["dataset"] == "ade20k" else groups["dataset"]
        assert release.name.startswith(dataset) and f"_{groups['task']}_" in release.name, release
        assert ("dinov3" in release.name) == groups["model"].startswith("dinov3"), release


def test_checkpoint_and_config_mismatch_is_one_line_naming_both(hub_cache):
    with pytest.raises(CheckpointError) as error:  # refused before any download
        api.load(DEMO, checkpoint="tue-mps/coco_panoptic_eomt_large_640")
    message = str(error.value)
    assert "\n" not in message
    assert (
        "tue-mps/coco_panoptic_eomt_large_640" in message and "experiment=coco_panoptic_vit_l_640" in message
    )
    assert "img_size=640x640" in message and "img_size=64x64" in message  # the checkpoint's and the config's


def test_name_missing_from_the_offline_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(
        CheckpointError, match=r"not in the Hugging Face cache .* run once online, or `hf download"
    ):
        api.load(DEMO, checkpoint="hf://someone/absent")


@pytest.mark.slow
def test_evaluate_reads_the_cache_named_by_the_environment(tmp_path, tmp_path_factory, demo_model):
    """The real command line: HF_HUB_CACHE and HF_HUB_OFFLINE set for a fresh process."""
    cache = tmp_path / "hf_cache"
    weights = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": authors_release_state(demo_model)}, weights)
    cache_repo(cache, "someone/eomt-demo", {"pytorch_model.bin": weights})
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "EOMT_CACHE": str(tmp_path_factory.getbasetemp() / "cache"),
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [
        sys.executable,
        str(REPO_ROOT / "evaluate.py"),
        *DEMO,
        "checkpoint=hf://someone/eomt-demo",
        "eval.num_overlays=0",
    ]
    result = subprocess.run(
        [*command, f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()

    # A released name without experiment=: its preset (ADE20K semantic, 512) is chosen, else this would
    # be a mismatch with the default COCO panoptic 640 config; it is not cached, which is one line.
    released = [
        sys.executable,
        str(REPO_ROOT / "evaluate.py"),
        "checkpoint=tue-mps/ade20k_semantic_eomt_large_512",
    ]
    missing = subprocess.run(
        [*released, "trainer.device=cpu"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "experiment=ade20k_semantic_vit_l_512" in missing.stdout
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "is not in the Hugging Face cache" in missing.stderr and str(cache) in missing.stderr
