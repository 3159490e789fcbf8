"""The Hydra config: compose it from conf/ outside a Hydra app (API, tests, benchmarks), check it."""

from collections.abc import Collection, Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig

from eomt import resolvers  # noqa: F401  (the ${workers:N} and ${concat:...} resolvers of conf/)
from eomt.device import AMP_DTYPES, CPU_PRECISIONS
from eomt.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped in the package (pip install works)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """`config_name` from conf/ with command-line overrides, e.g. ["model=vit_s", "model.num_blocks=2"]."""
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(f"no config {config_name}.yaml in {CONF_DIR}: pass an existing config_name")
    check_group_choices(overrides)
    running_app = (
        get_gh_backup()
    )  # inside a Hydra app (evaluate.py loading a released model): put it back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as e:
        raise composition_error(e) from None
    finally:
        restore_gh_from_backup(running_app)


def check_group_choices(overrides: Sequence[str]) -> None:
    """Each `group=choice` override names a file of conf/<group>/. Hydra checks that itself, except for
    the optional groups (experiment, debug, local), where a misspelt choice would be ignored in silence.
    Hydra's own groups (hydra/launcher=...) also take its plugins' choices: left to Hydra."""
    for override in overrides:
        key, sep, value = override.lstrip("+").partition("=")
        group = CONF_DIR / key
        if (
            not sep
            or key.startswith("hydra")
            or not group.is_dir()
            or value in ("", "null")
            or "," in value
            or "$" in value
        ):
            continue
        if not (group / f"{value}.yaml").is_file():
            options = sorted(p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml"))
            raise ConfigError(f"{key}={value} is not in conf/{key}/: use one of {'|'.join(options)}")


def composition_error(error: HydraException) -> ConfigError:
    """Hydra's multi-line composition error as one line naming the fix."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return ConfigError(
            f"{group}={name} is not in conf/{group}/: use one of {'|'.join(sorted(error.options))}"
        )
    message = str(error)
    if message.startswith("Could not override '") and "+" in message:
        key = message.split("'")[1]
        return ConfigError(f"{key} is not a config key: check its spelling (+{key}=... adds a new key)")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    noise = ("Config search path", "provider=", "full_key:", "object_type=", "Set the environment variable")
    return ConfigError(" ".join(line for line in lines if not line.startswith(noise)))


def check_overrides(argv: Sequence[str], config_name: str) -> None:
    """Compose `config_name` with a Hydra app's command line before the app starts, so that a bad
    override is one line (ConfigError) rather than Hydra's report. Command lines with flags
    (-m sweeps, --cfg, ...) are left to Hydra."""
    if not any(arg.startswith("-") for arg in argv):
        compose(argv, config_name)


def check_config(cfg: DictConfig) -> None:
    """Fail in one line on combinations the config groups cannot express (before anything is built)."""
    task = cfg.task.name
    if task not in cfg.dataset:
        supported = [t for t in ("panoptic", "semantic", "instance") if t in cfg.dataset]
        raise ConfigError(
            f"dataset {cfg.dataset.name} has no {task} annotations; use task={'|'.join(supported)}"
        )
    if cfg.trainer.resume not in ("auto", "never"):
        raise ConfigError(f"trainer.resume={cfg.trainer.resume} is not one of auto|never")
    precision = cfg.trainer.precision
    if precision not in AMP_DTYPES:
        raise ConfigError(f"trainer.precision={precision} is not one of {'|'.join(AMP_DTYPES)}")
    cpu_precision = cfg.eval.get("cpu_precision", "fp32")
    if cpu_precision not in CPU_PRECISIONS:
        raise ConfigError(f"eval.cpu_precision={cpu_precision} is not one of {'|'.join(CPU_PRECISIONS)}")
    crop, patch = list(cfg.dataset.crop_size), cfg.model.get("patch_size")
    if patch and any(side % patch for side in crop):
        fitting = [max(patch, round(side / patch) * patch) for side in crop]
        raise ConfigError(
            f"dataset.crop_size={crop} is not a multiple of model.patch_size={patch}; use e.g. "
            f"dataset.crop_size=[{fitting[0]},{fitting[1]}]"
        )


def split_key_values(
    argv: Sequence[str], own_keys: Collection[str], usage: str
) -> tuple[dict[str, str], list[str]]:
    """`key=value` arguments of a `python -m eomt....` command: (its own keys, the config overrides)."""
    own: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} is not key=value; {usage}")
        if key in own_keys:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides
