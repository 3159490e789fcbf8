"""Every preset composes, resolves and instantiates its parts (models on the meta device)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from eomt.config import CONF_DIR, compose
from eomt.data import build_dataset
from eomt.evaluation import build_evaluation
from eomt.model import build_model

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
EXPECTED = {  # preset -> (model, dataset, task, num_classes, crop)
    "coco_panoptic_vit_l_640": ("vit_l", "coco", "panoptic", 133, [640, 640]),
    "coco_instance_vit_l_1280": ("vit_l", "coco", "instance", 80, [1280, 1280]),
    "ade20k_semantic_vit_l_512": ("vit_l", "ade20k", "semantic", 150, [512, 512]),
    "ade20k_panoptic_vit_g_640": ("vit_g", "ade20k", "panoptic", 150, [640, 640]),
    "cityscapes_semantic_vit_l_1024": ("vit_l", "cityscapes", "semantic", 19, [1024, 1024]),
    "coco_panoptic_webssl_vit_7b_640": ("webssl_vit_7b", "coco", "panoptic", 133, [640, 640]),
    "coco_panoptic_dinov3_vit_7b_640": ("dinov3_vit_7b", "coco", "panoptic", 133, [640, 640]),
}


PUBLISHED = [
    *(
        f"coco_panoptic_{m}"
        for m in ("vit_s_2x_640", "vit_b_2x_640", "vit_l_640", "vit_g_640", "vit_l_1280", "vit_g_1280")
    ),
    "coco_instance_vit_l_640",
    "coco_instance_vit_l_1280",
    "ade20k_semantic_vit_l_512",
    *(f"ade20k_panoptic_{m}" for m in ("vit_l_640", "vit_g_640", "vit_l_1280", "vit_g_1280")),
    "cityscapes_semantic_vit_l_1024",
    "coco_panoptic_dinov3_vit_l_640",
    "coco_panoptic_webssl_vit_7b_640",
]
UNPUBLISHED = ["coco_panoptic_dinov3_vit_7b_640"]  # the 7B presets without a published result


def test_every_published_setting_has_a_preset():
    assert set(PUBLISHED) | set(UNPUBLISHED) | {"demo"} == set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_composes_and_instantiates(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}", f"dataset.root={tmp_path}", "model.pretrained=false"])
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["model"]["num_classes"] == len(container["dataset"]["class_names"])
    if experiment in EXPECTED:
        model, dataset, task, num_classes, crop = EXPECTED[experiment]
        assert (cfg.model.name, cfg.dataset.name, cfg.task.name) == (model, dataset, task)
        assert (cfg.model.num_classes, list(cfg.model.img_size)) == (num_classes, crop)
    with torch.device("meta"):
        network = build_model(cfg.model)
    assert network.num_classes == cfg.dataset.num_classes
    instantiate(cfg.loss)
    build_evaluation(cfg.eval, cfg.task.name)
    if cfg.dataset.name != "synthetic":  # the real datasets: no zips here, so a one-line error naming one
        with pytest.raises(FileNotFoundError, match=str(tmp_path)):
            build_dataset(cfg.dataset, cfg.task.name, "train", train=True)


def test_dataset_defaults_to_its_primary_task_and_task_switches():
    assert compose(["dataset=ade20k"]).task.name == "semantic"
    assert compose(["dataset=coco"]).task.name == "panoptic"
    assert compose(["dataset=cityscapes", "task=instance"]).dataset.num_classes == 8
    assert compose(["dataset=coco", "task=instance"]).task.num_queries == 200
    assert compose(["dataset=ade20k"]).task.num_queries == 100


def test_unsupported_dataset_task_pair_says_so_in_one_line():
    from eomt.config import check_config
    from eomt.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"^dataset coco has no semantic annotations; use task=panoptic\|instance$"
    ):
        check_config(compose(["dataset=coco", "task=semantic"]))


def test_the_users_command_without_data_says_which_file_to_get(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(repo / "train.py"),
            "dataset=ade20k",
            "model=vit_l",
            f"dataset.root={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ADE20K: expected") and "ADEChallengeData2016.zip" in last
    assert "Traceback" not in result.stderr


def test_worker_counts_default_to_what_the_machine_has(monkeypatch):
    from eomt import config, resolvers

    monkeypatch.setattr(resolvers, "usable_cpus", lambda: 2)
    cfg = config.compose(["experiment=demo", "trainer.num_workers=${workers:8}"])
    assert (
        cfg.trainer.num_workers == 1 and resolvers.worker_count(4) == 1
    )  # 2 CPUs: 1 worker + the main process
    monkeypatch.setattr(resolvers, "usable_cpus", lambda: 64)
    assert config.compose([]).trainer.num_workers == 8 and config.compose([]).eval.num_workers == 4
    monkeypatch.setattr(resolvers, "usable_cpus", lambda: 1)
    assert resolvers.worker_count(8) == 0
