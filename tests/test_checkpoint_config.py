"""A run directory or a Transformers folder loads with no overrides: the config it brings builds the network."""

import pytest
import torch
import transformers
from conftest import HF_DIMS

from eomt import api, predict
from eomt.checkpoint_config import compose_for
from eomt.config import compose
from eomt.errors import CheckpointError
from eomt.model import build_model
from eomt.run_info import write_run_info

RUN = ["experiment=demo", "model.num_queries=9", "model.num_blocks=3"]  # not any config's defaults


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as train.py leaves it: config.yaml and a checkpoint of the network it describes."""
    cfg = compose(RUN)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = tmp_path / "run"
    write_run_info(cfg, run)
    (run / "checkpoints").mkdir()
    torch.save({"model": model.state_dict(), "step": 5}, run / "checkpoints" / "step_00000005.pt")
    return run, model


def _assert_same_weights(a, b):
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


def test_run_directory_builds_its_own_network_and_classes(run_dir):
    run, trained = run_dir
    for checkpoint in (run, run / "checkpoints" / "step_00000005.pt"):
        loaded = api.load(checkpoint=str(checkpoint))  # no overrides: not the default vit_l / coco
        assert loaded.num_queries == 9 and loaded.num_blocks == 3
        _assert_same_weights(trained, loaded)

    args, overrides = predict.parse_args([f"checkpoint={run}", "input=x", "output=y", "eval.num_overlays=1"])
    _, cfg = predict.load_network(args, overrides, torch.device("cpu"))
    assert list(cfg.dataset.class_names) == ["disc", "box", "triangle", "sky", "ground"]
    assert cfg.eval.num_overlays == 1


def test_overrides_still_win_over_the_run_config(run_dir):
    run, _ = run_dir
    cfg = compose_for(["model.num_queries=4", "dataset.root=/elsewhere"], run)
    assert cfg.model.num_queries == 4 and cfg.model.num_blocks == 3 and cfg.dataset.root == "/elsewhere"
    assert cfg.model.name == "tiny" and cfg.dataset.name == "synthetic"
    assert compose_for(["model=vit_s"], run).model.name == "vit_s"  # a group chosen: composed as given
    assert compose_for(["experiment=demo"], run).model.num_queries != 9
    with pytest.raises(CheckpointError, match=r"does not fit this network: \d+ keys differ .*first q.weight"):
        api.load(["model.num_queries=4"], checkpoint=str(run))


DINOV3 = dict(
    intermediate_size=256, layer_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100.0}
)
HF_MODELS = {
    "dinov2": (transformers.EomtConfig, transformers.EomtForUniversalSegmentation, {}),
    "dinov3": (transformers.EomtDinov3Config, transformers.EomtDinov3ForUniversalSegmentation, DINOV3),
}


@pytest.mark.parametrize("family", HF_MODELS)
def test_transformers_folder_loads_from_its_config_json(tmp_path, family):
    config_class, model_class, extra = HF_MODELS[family]
    config = config_class(**HF_DIMS, **extra, id2label={i: f"thing{i}" for i in range(5)})
    torch.manual_seed(0)
    hf_model = model_class(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")

    ours = api.load(checkpoint=str(tmp_path / "hf"))  # no model or dataset overrides
    cfg = compose_for([], tmp_path / "hf")
    assert list(cfg.dataset.class_names) == [f"thing{i}" for i in range(5)]
    assert list(cfg.model.img_size) == [64, 64] and ours.num_queries == 7 and ours.num_blocks == 2

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ours.masked_attn = False  # inference, as Transformers with its masking probabilities at 0
    hf_model.attn_mask_probs.fill_(0.0)
    with torch.no_grad():
        expected = hf_model(pixel_values=(images - mean) / std)
        mask_logits, class_logits = ours(images)
    assert expected.class_queries_logits.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(class_logits[-1], expected.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mask_logits[-1], expected.masks_queries_logits, atol=1e-4, rtol=1e-4)


def test_transformers_labels_of_a_known_dataset_pick_its_config(tmp_path):
    names = list(compose(["dataset=cityscapes"]).dataset.class_names)
    config = transformers.EomtConfig(**{**HF_DIMS, "num_labels": len(names)}, id2label=dict(enumerate(names)))
    config.save_pretrained(tmp_path)
    cfg = compose_for([], tmp_path)
    assert cfg.dataset.name == "cityscapes" and cfg.task.name == "semantic"
    assert cfg.model.num_classes == len(names)
