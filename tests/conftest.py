"""Shared fixtures: a tiny random EoMT on either timm family."""

import re
from pathlib import Path

import pytest
import torch

from eomt.model import EoMT

TINY_BACKBONES = {
    "dinov2": "vit_small_patch14_reg4_dinov2",
    "dinov3": "vit_small_patch16_dinov3_qkvb",
}
TINY_DIMS = {"embed_dim": 64, "depth": 4, "num_heads": 2}
LAYER_SCALES = ("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")
# A Transformers EomtConfig matching the tiny EoMT (dim 64, 4 blocks, 2 query blocks, 7 queries, 5 classes).
HF_DIMS = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    num_blocks=2,
    num_queries=7,
    num_labels=5,
    num_register_tokens=4,
)


@pytest.fixture
def make_tiny_eomt():
    """make_tiny_eomt(family="dinov2", **EoMT kwargs): a 4-block dim-64 EoMT at 64 px, 7 queries, 5 classes.

    Random-init layer scales are set to 1 (timm's 1e-5 makes every block nearly the identity and hides
    what attention does); pretrained weights are left as loaded.
    """

    def make(family: str = "dinov2", **kwargs) -> EoMT:
        options = dict(
            img_size=64, num_classes=5, num_queries=7, num_blocks=2, backbone_kwargs=dict(TINY_DIMS)
        )
        options.update(kwargs)
        model = EoMT(TINY_BACKBONES[family], **options)
        if not model.backbone_pretrained:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(LAYER_SCALES):
                        param.fill_(1.0)
        return model

    return make


def authors_release_state(model: EoMT) -> dict[str, torch.Tensor]:
    """The authors' release layout written by hand: network.encoder.backbone.<timm key>, network.<head>."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            state["network.encoder.backbone." + key.removeprefix("backbone.")] = value
        else:
            state["network." + key] = value
    state["network.encoder.pixel_mean"] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    state["network.encoder.pixel_std"] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    state["criterion.empty_weight"] = torch.ones(model.num_classes + 1)
    return state


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing in the tests may download: a stray hub request fails at once instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def logged(run_dir, tag: str = "train/loss") -> dict[int, float]:
    """step -> value of a TensorBoard scalar the run wrote (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def stepped(run_dir) -> bool:
    """train.py's loop has finished a step (the first is always logged): a signal from now on stops it
    at step 1 or later. Under load the first step can take tens of seconds after the loop starts."""
    log = Path(run_dir) / "train.log"
    return log.is_file() and re.search(r"\] step [1-9]\d*/\d+ ", log.read_text(errors="replace")) is not None
