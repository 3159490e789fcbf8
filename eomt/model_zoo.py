"""The authors' released checkpoints by name, fetched through huggingface_hub's cache.

`checkpoint=tue-mps/coco_panoptic_eomt_large_640` (or `hf://<org>/<repo>[@revision]`, any repo holding
the authors' `pytorch_model.bin` or a Transformers EoMT) is downloaded once into the Hugging Face cache
(HF_HOME / HF_HUB_CACHE) and read from there afterwards, also with HF_HUB_OFFLINE=1. A released name
brings its preset: the overrides that build the network it was trained as, added to the user's
where the user gave no `experiment=` (docs/model_zoo.md lists them with their published numbers).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from eomt.errors import CheckpointError

HUB_SCHEME = "hf://"
RELEASE_ORG = "tue-mps"
# The authors' own file first (what their published numbers were measured with), then Transformers'.
_HUB_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "model.safetensors.index.json")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Release:
    """One published checkpoint: its preset and its published result (H100, batch 1, torch.compile)."""

    name: str  # the repo under tue-mps/
    preset: tuple[str, ...]  # the overrides that build its network and evaluation
    metric: str  # PQ, mIoU or AP
    value: float
    fps: str  # as published; DINOv3 rows: compile default / max-autotune
    note: str = ""

    @property
    def repo_id(self) -> str:
        return f"{RELEASE_ORG}/{self.name}"


def _dinov3(name: str, experiment: str, model: str, metric: str, value: float, fps: str) -> Release:
    return Release(name, (f"experiment={experiment}", f"model={model}"), metric, value, fps, "backbone delta")


RELEASES: dict[str, Release] = {
    r.repo_id: r
    for r in (
        Release("coco_panoptic_eomt_small_640_2x", ("experiment=coco_panoptic_vit_s_2x_640",), "PQ", 46.7, "330"),
        Release("coco_panoptic_eomt_base_640_2x", ("experiment=coco_panoptic_vit_b_2x_640",), "PQ", 51.6, "261"),
        Release("coco_panoptic_eomt_large_640", ("experiment=coco_panoptic_vit_l_640",), "PQ", 56.0, "128"),
        Release("coco_panoptic_eomt_giant_640", ("experiment=coco_panoptic_vit_g_640",), "PQ", 57.0, "55"),
        Release("coco_panoptic_eomt_large_1280", ("experiment=coco_panoptic_vit_l_1280",), "PQ", 58.3, "30"),
        Release("coco_panoptic_eomt_giant_1280", ("experiment=coco_panoptic_vit_g_1280",), "PQ", 59.2, "12"),
        Release("coco_panoptic_eomt_7b_640", ("experiment=coco_panoptic_webssl_vit_7b_640",), "PQ", 58.4, "32 (B200)", "Web-SSL DINO 7B"),
        Release("ade20k_panoptic_eomt_large_640", ("experiment=ade20k_panoptic_vit_l_640",), "PQ", 50.6, "128", "COCO pre-trained"),
        Release("ade20k_panoptic_eomt_giant_640", ("experiment=ade20k_panoptic_vit_g_640",), "PQ", 51.3, "55", "COCO pre-trained"),
        Release("ade20k_panoptic_eomt_large_1280", ("experiment=ade20k_panoptic_vit_l_1280",), "PQ", 51.7, "30", "COCO pre-trained"),
        Release("ade20k_panoptic_eomt_giant_1280", ("experiment=ade20k_panoptic_vit_g_1280",), "PQ", 52.8, "12", "COCO pre-trained"),
        Release("ade20k_semantic_eomt_large_512", ("experiment=ade20k_semantic_vit_l_512",), "mIoU", 58.4, "92"),
        Release("cityscapes_semantic_eomt_large_1024", ("experiment=cityscapes_semantic_vit_l_1024",), "mIoU", 84.2, "25"),
        Release("coco_instance_eomt_large_640", ("experiment=coco_instance_vit_l_640",), "AP", 45.2, "128"),
        Release("coco_instance_eomt_large_1280", ("experiment=coco_instance_vit_l_1280",), "AP", 48.8, "30"),
        _dinov3("coco_panoptic_eomt_small_640_dinov3", "coco_panoptic_vit_s_2x_640", "dinov3_vit_s", "PQ", 47.2, "246 / 570"),
        _dinov3("coco_panoptic_eomt_base_640_dinov3", "coco_panoptic_vit_b_2x_640", "dinov3_vit_b", "PQ", 53.1, "240 / 347"),
        Release("coco_panoptic_eomt_large_640_dinov3", ("experiment=coco_panoptic_dinov3_vit_l_640",), "PQ", 56.8, "137 / 157", "backbone delta"),
        _dinov3("coco_panoptic_eomt_large_1280_dinov3", "coco_panoptic_vit_l_1280", "dinov3_vit_l", "PQ", 58.9, "33 / 34"),
        _dinov3("ade_semantic_eomt_large_512_dinov3", "ade20k_semantic_vit_l_512", "dinov3_vit_l", "mIoU", 59.5, "137 / 200"),
        _dinov3("coco_instance_eomt_large_640_dinov3", "coco_instance_vit_l_640", "dinov3_vit_l", "AP", 45.9, "133 / 157"),
        _dinov3("coco_instance_eomt_large_1280_dinov3", "coco_instance_vit_l_1280", "dinov3_vit_l", "AP", 49.9, "33 / 34"),
    )
}  # fmt: skip


def hub_repo(checkpoint: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision) when `checkpoint` names a hub repo: `hf://org/repo[@rev]`, or
    `tue-mps/<repo>` that is not a local path; None for a local path."""
    text = str(checkpoint)
    if text.startswith("hf:/"):  # also hf:/org/repo, what Path() makes of hf://org/repo
        text = text.removeprefix("hf:").lstrip("/")
    elif not (text.startswith(RELEASE_ORG + "/") and not Path(text).exists()):
        return None
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(
            f"checkpoint={checkpoint} is not a hub repo id: write hf://<org>/<repo>[@revision]"
        )
    return repo_id, revision or None


def release_of(checkpoint: str | Path | None) -> Release | None:
    repo = hub_repo(checkpoint) if checkpoint is not None else None
    return RELEASES.get(repo[0]) if repo else None


def with_preset(overrides: Sequence[str], checkpoint: str | Path | None = None) -> list[str]:
    """`overrides` plus the preset of a released checkpoint (named by `checkpoint`, else by a
    `checkpoint=` override) for every key the user left out; unchanged when the user gave an experiment."""
    overrides = list(overrides)
    keys = {o.partition("=")[0].lstrip("+~") for o in overrides}
    at = next((i for i, o in enumerate(overrides) if o.startswith("checkpoint=")), None)
    if checkpoint is None and at is not None:
        checkpoint = overrides[at].partition("=")[2]
    at = at or 0
    release = release_of(checkpoint)
    if release is None or "experiment" in keys:
        return overrides
    added = [o for o in release.preset if o.partition("=")[0] not in keys]
    return overrides[:at] + added + overrides[at:]  # next to checkpoint=, among the other overrides


_FIT_KEYS = ("backbone", "img_size", "num_blocks", "num_queries", "num_classes")


def _facts(model_cfg: DictConfig, keys: Sequence[str]) -> str:
    def show(value):
        return (
            "x".join(map(str, value)) if isinstance(value, Sequence) and not isinstance(value, str) else value
        )

    return ", ".join(f"{k}={show(model_cfg[k])}" for k in keys)


def check_fits(checkpoint: str | Path, model_cfg: DictConfig, skip_class_head: bool = False) -> None:
    """A released checkpoint with a config that builds another network: one line naming both."""
    release = release_of(checkpoint)
    if release is None:
        return
    from eomt.config import compose  # here: composing needs Hydra, which the rest of this module does not

    expected = compose(release.preset).model
    keys = [k for k in _FIT_KEYS if not (skip_class_head and k == "num_classes")]
    got = {k: model_cfg[k] for k in keys}
    if any(expected[k] != v for k, v in got.items()):
        raise CheckpointError(
            f"checkpoint={checkpoint} is the network of `{' '.join(release.preset)}` ({_facts(expected, keys)}) "
            f"but the config builds {_facts(model_cfg, keys)}: pass `{' '.join(release.preset)}` (evaluate.py, "
            "predict and eomt.api.load do when experiment= is left out), or a checkpoint of this network"
        )


def download_file(checkpoint: str | Path, filename: str) -> Path | None:
    """One more file of a hub checkpoint's repo (e.g. config.json), through the Hugging Face cache;
    None when the repo has none, or the cache has none and the hub cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, revision = hub_repo(checkpoint)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def download(checkpoint: str | Path) -> Path:
    """The local path of a hub checkpoint's weights, downloaded into the Hugging Face cache if needed."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = hub_repo(checkpoint)
    not_cached = False
    for filename in _HUB_WEIGHT_FILES:
        try:
            path = Path(hf_hub_download(repo_id, filename, revision=revision))
        except LocalEntryNotFoundError:  # offline (or no connection) and not in the cache
            not_cached = True
            continue
        except EntryNotFoundError:  # the repo has no such file
            continue
        except GatedRepoError as e:
            raise CheckpointError(
                f"checkpoint={checkpoint}: {repo_id} is gated; accept its terms on huggingface.co "
                "and log in (`hf auth login`)"
            ) from e
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint={checkpoint}: no such repo or revision on the Hugging Face hub; "
                "check the name (docs/model_zoo.md lists the released ones)"
            ) from e
        except (HfHubHTTPError, OSError) as e:  # the hub answered with an error, or the disk did
            reason = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"checkpoint={checkpoint}: fetching {filename} failed ({reason}); retry"
            ) from e
        if filename.endswith(".index.json"):
            for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                hf_hub_download(repo_id, shard, revision=revision)
        return path
    if not_cached:
        raise CheckpointError(
            f"checkpoint={checkpoint} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
            f"cannot be reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): run once online, or "
            f"`hf download {repo_id} pytorch_model.bin`"
        )
    raise CheckpointError(f"checkpoint={checkpoint}: {repo_id} holds none of {', '.join(_HUB_WEIGHT_FILES)}")
