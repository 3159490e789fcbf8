"""The config a checkpoint brings, so that a run directory or a Transformers folder loads as it is.

- a run directory, or a checkpoint inside one (`<run>/checkpoints/step_N.pt`, a sharded `step_N/`): the
  run's resolved `config.yaml` (eomt.run_info); a checkpoint of ours elsewhere: the resolved config it carries;
- a Transformers `save_pretrained` folder, a weights file in one, or `hf://<org>/<repo>` holding one: its
  `config.json` (hidden size, depth, heads, query blocks, queries, classes, image size, label names);
- a released name (`tue-mps/<repo>`): its preset (eomt.model_zoo.with_preset).

The command line still wins: a group the user chooses (`model=`, `dataset=` or `task=`, `experiment=`) is
composed as given, and a `model.*` / `dataset.*` / `task.*` override replaces the checkpoint's value.
`compose_for(overrides, checkpoint)` is what eomt.api, eomt.predict and eomt.export compose with;
evaluate.py (a Hydra app) calls `checkpoint_overrides` before Hydra composes and `adopt_run_config` after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from eomt import model_zoo, sharded
from eomt.config import CONF_DIR, compose
from eomt.errors import CheckpointError

RUN_CONFIG = "config.yaml"  # eomt.run_info.write_run_info
TRANSFORMERS_CONFIG = "config.json"
_SECTIONS = ("model", "dataset", "task")  # what builds the network and names its classes


def _keys(overrides: Sequence[str]) -> list[str]:
    return [o.partition("=")[0].lstrip("+~") for o in overrides]


def _chosen(overrides: Sequence[str]) -> set[str]:
    """The groups the command line chooses itself; dataset and task go together (a resolved dataset
    section holds one task's classes)."""
    keys = set(_keys(overrides))
    if "experiment" in keys:
        return set(_SECTIONS)
    chosen = keys & set(_SECTIONS)
    return chosen | ({"dataset", "task"} if chosen & {"dataset", "task"} else set())


# --- a run directory or our checkpoint file -----------------------------------------------------------


def run_directory(checkpoint: str | Path) -> Path | None:
    """The run directory holding `checkpoint` (the directory itself, or `<run>/checkpoints/<file>`) when
    it has a saved config; None otherwise."""
    path = Path(checkpoint)
    for run_dir in (path, path.parent.parent if path.parent.name == "checkpoints" else None):
        if run_dir is not None and (run_dir / RUN_CONFIG).is_file() and path.exists():
            return run_dir
    return None


def training_config(checkpoint: Path) -> dict | None:
    """The resolved config a checkpoint file of ours carries (None for the release's and Transformers');
    a sharded checkpoint directory carries it in its train state file."""
    if sharded.is_sharded(checkpoint):
        checkpoint = checkpoint / sharded.TRAIN_STATE
    if not checkpoint.is_file():
        return None
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # safetensors and other formats that carry no config
        return None
    config = obj.get("config") if isinstance(obj, Mapping) else None
    return config if isinstance(config, Mapping) else None


def run_config(checkpoint: str | Path | None) -> DictConfig | None:
    """The resolved training config of a run directory or of a checkpoint of ours; None for others."""
    if checkpoint is None or model_zoo.hub_repo(checkpoint) is not None:
        return None
    run_dir = run_directory(checkpoint)
    if run_dir is not None:
        return OmegaConf.load(run_dir / RUN_CONFIG)
    path = Path(checkpoint)
    ours = path.suffix in (".pt", ".pth", ".ckpt") or sharded.is_sharded(path)
    carried = training_config(path) if ours else None
    return OmegaConf.create(carried) if carried and all(s in carried for s in _SECTIONS) else None


def adopt_run_config(cfg: DictConfig, overrides: Sequence[str], checkpoint: str | Path | None) -> bool:
    """Put the run's `model`, `dataset` and `task` into the composed `cfg` (in place) where `overrides`
    leave them open, the dotted overrides re-applied on top. True when a run config was used."""
    saved = run_config(checkpoint)
    if saved is None:
        return False
    open_sections = [s for s in _SECTIONS if s not in _chosen(overrides) and s in saved]
    if not open_sections:
        return False
    given = {k: OmegaConf.select(cfg, k) for k in _keys(overrides) if k.split(".")[0] in open_sections}
    with open_dict(cfg):
        for section in open_sections:
            cfg[section] = saved[section]
        for key, value in given.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return True


# --- a Transformers folder or hub repo --------------------------------------------------------------

# timm backbones by Transformers config class, and their standard (dim, depth, heads).
_DINOV2 = {
    384: ("vit_small_patch14_reg4_dinov2", 12, 6),
    768: ("vit_base_patch14_reg4_dinov2", 12, 12),
    1024: ("vit_large_patch14_reg4_dinov2", 24, 16),
    1536: ("vit_giant_patch14_reg4_dinov2", 40, 24),
}
_DINOV3 = {
    384: ("vit_small_patch16_dinov3_qkvb", 12, 6),
    768: ("vit_base_patch16_dinov3_qkvb", 12, 12),
    1024: ("vit_large_patch16_dinov3_qkvb", 24, 16),
}


def transformers_config_file(checkpoint: str | Path | None) -> Path | None:
    """The config.json of a Transformers checkpoint: next to its weights, or in its hub repo (cached)."""
    if checkpoint is None or model_zoo.release_of(checkpoint) is not None:
        return None  # a released name builds from its preset
    if model_zoo.hub_repo(checkpoint) is not None:
        return model_zoo.download_file(checkpoint, TRANSFORMERS_CONFIG)
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix not in (".safetensors", ".bin", ".json"):
        return None
    file = folder / TRANSFORMERS_CONFIG
    return file if file.is_file() and not (folder / "checkpoints").is_dir() else None


def _backbone(config: dict, source: Path) -> tuple[str, dict]:
    """The timm backbone and its extra kwargs for a Transformers EoMT config."""
    model_type = config.get("model_type", "eomt")
    dim, depth, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kwargs: dict = {}
    if model_type == "eomt":
        if config.get("num_register_tokens", 4) != 4:
            raise CheckpointError(
                f"{source}: {config['num_register_tokens']} register tokens; the timm DINOv2 backbones have 4"
            )
        swiglu = bool(config.get("use_swiglu_ffn"))
        name, std_depth, std_heads = _DINOV2.get(dim, _DINOV2[1536 if swiglu else 384])
        mlp_ratio = config.get("mlp_ratio", 4)
        if swiglu:  # timm's SwiGLUPacked fc1 holds gate and value: twice Transformers' hidden size
            hidden = (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8
            if (name, dim) != (_DINOV2[1536][0], 1536) or hidden != 4096:
                kwargs["mlp_ratio"] = 2 * hidden / dim
        elif mlp_ratio != 4:
            kwargs["mlp_ratio"] = mlp_ratio
    elif model_type == "eomt_dinov3":
        name, std_depth, std_heads = _DINOV3.get(dim, _DINOV3[384])
        if config.get("intermediate_size", 4 * dim) != 4 * dim:
            kwargs["mlp_ratio"] = config["intermediate_size"] / dim
        if config.get("pos_embed_rescale") is not None:
            kwargs["rope_rescale_coords"] = config["pos_embed_rescale"]
    else:
        raise CheckpointError(
            f"{source}: model_type {model_type} is not a Transformers EoMT (eomt, eomt_dinov3)"
        )
    if dim not in (_DINOV2 if model_type == "eomt" else _DINOV3) or depth != std_depth or heads != std_heads:
        kwargs.update(embed_dim=dim, depth=depth, num_heads=heads)
    return name, kwargs


def _label_sets() -> Iterator[tuple[str, str, list[str]]]:
    """(dataset, task, class names) of every dataset config in conf/dataset, its primary task first."""
    for file in sorted((CONF_DIR / "dataset").glob("*.yaml")):
        node = OmegaConf.create({"dataset": OmegaConf.load(file)})
        defaults = node.dataset.get("defaults") or []
        primary = next((d["/task@_global_.task"] for d in defaults if "/task@_global_.task" in d), None)
        for task in sorted(("panoptic", "semantic", "instance"), key=lambda t: t != primary):
            names = OmegaConf.select(node, f"dataset.{task}.class_names", throw_on_missing=False)
            if names is not None:
                yield file.stem, task, list(names)


def _override_value(value) -> str:
    """A value in Hydra's override grammar: numbers, lists, double-quoted strings."""
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def transformers_overrides(config_file: Path, overrides: Sequence[str]) -> list[str]:
    """Overrides that build the network of a Transformers config.json, and name its classes: a dataset
    config whose class names are its labels, else its labels (all of them things, as Transformers'
    post-processing without stuff classes), for every key `overrides` leave out."""
    config = json.loads(config_file.read_text())
    name, kwargs = _backbone(config, config_file)
    size = config.get("image_size", 640)
    size = [size, size] if isinstance(size, int) else list(size)
    patch = config.get("patch_size", 16)
    num_classes = config.get("num_labels") or len(config.get("id2label", {}))
    labels = [config.get("id2label", {}).get(str(i), str(i)) for i in range(num_classes)]
    chosen = _chosen(overrides)
    added = []
    if "model" not in chosen:
        added += [
            f"model.backbone={name}",
            *(f"++model.backbone_kwargs.{k}={_override_value(v)}" for k, v in kwargs.items()),
            f"model.img_size={_override_value(size)}",
            f"model.patch_size={patch if isinstance(patch, int) else patch[0]}",
            f"model.num_blocks={config.get('num_blocks', 4)}",
            f"model.num_queries={config.get('num_queries', 200)}",
            f"model.num_upscale_blocks={config.get('num_upscale_blocks', 2)}",
            "model.name=transformers",
        ]
    if "dataset" not in chosen:
        match = next(((d, t) for d, t, names in _label_sets() if names == labels), None)
        if match is not None:
            added += [f"dataset={match[0]}", f"task={match[1]}"]
        else:
            added += [
                f"dataset.num_classes={num_classes}",
                f"dataset.class_names={_override_value(labels)}",
                f"dataset.thing_classes={_override_value(list(range(num_classes)))}",
            ]
    keys = set(_keys(overrides))
    return [o for o in added if o.partition("=")[0].lstrip("+") not in keys]


# --- together ---------------------------------------------------------------------------------------


def checkpoint_overrides(overrides: Sequence[str], checkpoint: str | Path | None = None) -> list[str]:
    """`overrides` plus those a released name's preset or a Transformers config.json brings (before
    composing); a run directory's config comes after composing (`adopt_run_config`)."""
    overrides = model_zoo.with_preset(overrides, checkpoint)
    if checkpoint is None:
        checkpoint = next((o.partition("=")[2] for o in overrides if o.startswith("checkpoint=")), None)
    config_file = transformers_config_file(checkpoint)
    return overrides + transformers_overrides(config_file, overrides) if config_file else overrides


def compose_for(overrides: Sequence[str], checkpoint: str | Path | None = None) -> DictConfig:
    """The training config for loading `checkpoint`: composed from `overrides` and what it brings."""
    cfg = compose(checkpoint_overrides(overrides, checkpoint))
    adopt_run_config(cfg, overrides, checkpoint)
    return cfg
