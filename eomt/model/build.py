"""Build the network from its config node (`cfg.model`)."""

from collections.abc import Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from eomt.model.pretrained import check_pretrained_reachable


def build_model(model_cfg: DictConfig | Mapping) -> nn.Module:
    """Instantiate `model_cfg` (a conf/model/*.yaml node) without its `name`, which only labels runs.

    Pretrained backbone weights that are neither cached nor downloadable stop it in one line first."""
    if isinstance(model_cfg, DictConfig):
        kwargs = OmegaConf.to_container(model_cfg, resolve=True)
    else:
        kwargs = dict(model_cfg)
    if "_target_" not in kwargs:
        raise ValueError("model config has no _target_: pick a model with model=<name> (see conf/model/)")
    kwargs.pop("name", None)
    if kwargs.get("pretrained") and not kwargs.get("pretrained_file") and "backbone" in kwargs:
        check_pretrained_reachable(kwargs["backbone"])  # offline without the weights: one quick line
    return instantiate(kwargs, _convert_="all")
