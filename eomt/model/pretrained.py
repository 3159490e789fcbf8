"""Find a backbone's pretrained weights before timm fetches them, so that offline is one quick line.

timm downloads pretrained weights from the Hugging Face hub into its cache (HF_HOME / HF_HUB_CACHE).
Offline (HF_HUB_OFFLINE=1, or no route to the hub) with the weights not cached, timm would retry for
about a minute and end with the hub's generic message; `check_pretrained_reachable` ends it at once
with one line naming the weights and the two ways on: a local file, or no pretrained weights.
"""

from __future__ import annotations

from eomt.errors import ConfigError
from eomt.model.transformers_backbone import is_hub_backbone

_PROBE_TIMEOUT_S = 5.0  # one HEAD request, no retries


def _hub_repo(backbone: str) -> tuple[str, tuple[str, ...]] | None:
    """The hub repo for `backbone`'s default pretrained weights and the file names tried: timm's, or the
    repo itself for a Transformers hub backbone (org/name)."""
    from timm.models import get_pretrained_cfg

    if is_hub_backbone(backbone):
        return backbone, ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")

    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        return None
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ()
    return cfg.hf_hub_id, (*names, "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")


def _hub_unreachable(repo_id: str, filename: str) -> str | None:
    """Why the hub cannot be asked for the file (offline mode, no connection), or None when it can."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=_PROBE_TIMEOUT_S)
    except HfHubHTTPError:  # the hub answered (e.g. no such file): timm takes it from here
        return None
    except Exception as e:  # no route, DNS, timeout, proxy
        return f"the hub cannot be reached ({type(e).__name__})"
    return None


def check_pretrained_reachable(backbone: str) -> None:
    """ConfigError when `backbone`'s pretrained weights are neither in the local cache nor downloadable."""
    from huggingface_hub import constants, try_to_load_from_cache

    found = _hub_repo(backbone)
    if found is None:  # weights from a URL or elsewhere: timm's own handling
        return
    repo_id, filenames = found
    if any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames):
        return
    reason = _hub_unreachable(repo_id, filenames[0])
    if reason is None:
        return
    raise ConfigError(
        f"the pretrained weights of {backbone} (hub repo {repo_id}) are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {reason}: download them once online (`hf download {repo_id}`), "
        "or pass model.pretrained_file=<local weights file>, or model.pretrained=false to start from random weights"
    )
