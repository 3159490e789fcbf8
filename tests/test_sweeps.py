"""Every ablation sweep composes and expands to its jobs; the launchers render what SLURM needs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eomt import report
from eomt.config import CONF_DIR
from eomt.tb_hparams import sweep_hparams

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR

# sweep -> {run sub-directory: the values that job must have}. For the sweeps that only change
# values (not the model group), a job may differ from the plain config in these keys only.
SWEEPS: dict[str, dict[str, dict]] = {
    "annealing": {
        "0_masked_train_infer": {"schedule.annealing": False, "eval.masked_attn": True},
        "1_masked_train_only": {"schedule.annealing": False, "eval.masked_attn": False},
        "2_never_masked": {"model.masked_attn": False},
        "3_annealed": {"schedule.annealing": True, "model.masked_attn": True},
    },
    "removal": {
        "0_eomt": {},
        "1_no_upscale": {"model.num_upscale_blocks": 0},
        "2_no_intermediate_losses": {"trainer.intermediate_losses": False},
        "3_no_layer_decay": {"schedule.layer_decay": 1.0},
        "4_no_two_stage_warmup": {"schedule.two_stage_warmup": False},
    },
    "num_blocks": {f"{i}_num_blocks_{n}": {"model.num_blocks": n} for i, n in enumerate([2, 4, 6, 9])},
    "num_queries": {f"{i}_queries_{n}": {"model.num_queries": n} for i, n in enumerate([50, 100, 200, 400])},
    "crop_size": {
        "0_crop_640x640": {"dataset.crop_size": [640, 640], "model.img_size": [640, 640]},
        "1_crop_1280x1280": {"dataset.crop_size": [1280, 1280], "model.img_size": [1280, 1280]},
    },
    "model_size": {
        "0_vit_s": {"model.backbone": "vit_small_patch14_reg4_dinov2", "model.num_blocks": 3},
        "1_vit_b": {"model.backbone": "vit_base_patch14_reg4_dinov2", "model.num_blocks": 3},
        "2_vit_l": {"model.backbone": "vit_large_patch14_reg4_dinov2", "model.num_blocks": 4},
        "3_vit_g": {"model.backbone": "vit_giant_patch14_reg4_dinov2", "model.num_blocks": 5},
    },
    "pretraining": {
        "0_dinov2": {"model.backbone": "vit_large_patch14_reg4_dinov2"},
        "1_dinov3": {"model.backbone": "vit_large_patch16_dinov3_qkvb"},
        "2_eva02": {"model.backbone": "eva02_large_patch14_224.mim_m38m"},
        "3_deit3": {"model.backbone": "deit3_large_patch16_224.fb_in22k_ft_in1k"},
    },
}
CHANGES_THE_MODEL_GROUP = {"model_size", "pretraining"}
NOT_OURS = {"components"}  # the Mask2Former component path has its own tests


@pytest.fixture(scope="module")
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def plain(hydra_conf) -> DictConfig:
    """The config without any sweep: what every job is compared with."""
    return compose("train", return_hydra_config=True)


def compose_job(overrides: list[str], job_num: int = 0) -> DictConfig:
    cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = job_num  # set by the launcher in a real sweep
    return cfg


def expand(sweep: str, extra: tuple[str, ...] = ()) -> tuple[DictConfig, list[list[str]]]:
    """The jobs Hydra's basic sweeper makes of `python train.py -m +sweep=<sweep> <extra>`."""
    arguments = [f"+sweep={sweep}", *extra]
    cfg = compose("train", overrides=arguments, return_hydra_config=True)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params + arguments), None)
    return cfg, batches[0]


def flat(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(container, "")
    return out


def test_every_sweep_file_is_tested():
    files = {p.stem for p in (CONF / "sweep").glob("*.yaml")}
    assert files - NOT_OURS == set(SWEEPS)


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_sweep_expands_to_its_jobs_with_telling_directory_names(plain, sweep):
    expected = SWEEPS[sweep]
    master, jobs = expand(sweep)
    assert len(jobs) == len(expected)
    plain_flat = flat(plain)
    sweep_dirs, subdirs = set(), []
    for num, overrides in enumerate(jobs):
        cfg = compose_job(overrides, num)
        sweep_dirs.add(cfg.hydra.sweep.dir)
        subdirs.append(cfg.hydra.sweep.subdir)
        wanted = expected[cfg.hydra.sweep.subdir]
        for key, value in wanted.items():
            if OmegaConf.select(plain, key, default="<absent>") == "<absent>":
                pytest.fail(f"sweep {sweep}: {key} is not a key of the config, so setting it changes nothing")
            got = OmegaConf.select(cfg, key)
            assert (OmegaConf.to_object(got) if OmegaConf.is_config(got) else got) == value, (sweep, key)
        if sweep not in CHANGES_THE_MODEL_GROUP:
            differs = {k for k, v in flat(cfg).items() if plain_flat.get(k, "<absent>") != v}
            assert differs <= set(wanted) | {"variant"}, (
                f"{sweep} job {num} also changes {differs - set(wanted)}"
            )
    assert subdirs == list(expected)  # one directory per job, named after what it varies
    # All jobs share one sweep directory (the one the launcher and `tensorboard --logdir` use).
    assert sweep_dirs == {master.hydra.sweep.dir}
    assert sweep in master.hydra.sweep.dir


def test_command_line_overrides_reach_every_job(hydra_conf):
    _, jobs = expand("num_blocks", ("trainer.batch_size=32",))
    assert len(jobs) == 4
    assert all(compose_job(job).trainer.batch_size == 32 for job in jobs)


def test_hparams_columns_are_the_keys_the_sweep_varies(hydra_conf):
    _, jobs = expand("annealing")
    cfg = compose_job(jobs[2], 2)  # never_masked
    HydraConfig.instance().set_config(cfg)
    try:
        got = sweep_hparams(cfg, jobs[2])
    finally:
        HydraConfig.instance().cfg = None
    assert got == {
        "sweep": "annealing",
        "sweep/annealing": "never_masked",
        "variant": "never_masked",
        "schedule.annealing": True,
        "model.masked_attn": False,
        "eval.masked_attn": False,
    }
    assert sweep_hparams(cfg, ["seed=3"]) == {"seed": 3}  # outside a Hydra app: the overrides as given


def test_in_a_multirun_hparams_columns_leave_out_what_every_job_shares(hydra_conf, tmp_path):
    """`train.py -m +sweep=annealing experiment=demo seed=0,1`: the swept keys, not experiment=demo."""
    command_line = ["+sweep=annealing", "experiment=demo", "seed=0,1"]
    OmegaConf.save({"hydra": {"overrides": {"task": command_line}}}, tmp_path / "multirun.yaml")
    job = ["+sweep=annealing", "experiment=demo", "seed=1", "+sweep/annealing=masked_train_infer"]
    cfg = compose("train", overrides=[*job, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    try:
        got = sweep_hparams(cfg, job)
    finally:
        HydraConfig.instance().cfg = None
    assert got == {
        "seed": 1,
        "sweep/annealing": "masked_train_infer",
        "variant": "masked_train_infer",
        "schedule.annealing": False,
        "model.masked_attn": True,
        "eval.masked_attn": True,
    }


# --- launchers ---------------------------------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`srun` on PATH so that submitit accepts to build a SLURM executor on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def render_sbatch(
    hydra_conf_overrides: list[str], tmp_path: Path, monkeypatch
) -> tuple[str, submitit.AutoExecutor]:
    """The sbatch script the launcher would submit, built by the real plugin (submission intercepted)."""
    cfg = compose(
        "train",
        overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}", *hydra_conf_overrides],
        return_hydra_config=True,
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    captured = {}

    def map_array(executor, fn, *iterables):
        captured["executor"] = executor
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher.launch([["seed=0"]], initial_job_idx=0)
    executor = captured["executor"]
    return executor._executor._make_submission_file_text(
        "python -u -m submitit.core._submit x", "uid"
    ), executor


def test_slurm_launcher_defaults_fit_a_4_gpu_node_and_requeue(hydra_conf, fake_slurm, tmp_path, monkeypatch):
    script, executor = render_sbatch(["hydra/launcher=slurm"], tmp_path, monkeypatch)
    lines = set(script.splitlines())
    for flag in (
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--cpus-per-task=16",
        "--nodes=1",
        "--mem=256GB",
        "--time=1440",
        "--signal=USR2@300",
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {flag}" in lines, flag
    assert not any(
        line.startswith(("#SBATCH --partition", "#SBATCH --account", "#SBATCH --qos")) for line in lines
    )
    assert executor._executor.max_num_timeout > 0  # submitit's default 0 would never requeue on timeout
    assert any(line.startswith("srun ") for line in lines)  # one task per GPU, ranks from SLURM_PROCID
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in script


def test_slurm_launcher_site_settings(hydra_conf, fake_slurm, tmp_path, monkeypatch):
    script, _ = render_sbatch(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj42",
            "hydra.launcher.qos=high",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.constraint=h100",
            "hydra.launcher.timeout_min=2880",
            "hydra.launcher.signal_delay_s=600",
        ],
        tmp_path,
        monkeypatch,
    )
    lines = set(script.splitlines())
    for flag in (
        "--partition=gpu",
        "--account=proj42",
        "--qos=high",
        "--nodes=2",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--constraint=h100",
        "--time=2880",
        "--signal=USR2@600",
    ):
        assert f"#SBATCH {flag}" in lines, flag


def test_local_launcher_composes(hydra_conf, tmp_path, monkeypatch):
    cfg = compose("train", overrides=["hydra/launcher=local"], return_hydra_config=True)
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher_cfg["_target_"].endswith("LocalLauncher")
    assert launcher_cfg["tasks_per_node"] == 1
    assert (
        launcher_cfg["gpus_per_node"] is None and launcher_cfg["max_parallel"] is None
    )  # one job per GPU, or 1
    cfg = compose(
        "train", overrides=["hydra/launcher=local", "hydra.launcher.max_parallel=2"], return_hydra_config=True
    )
    assert cfg.hydra.launcher.max_parallel == 2


@pytest.mark.slow
def test_local_launcher_runs_a_two_job_demo_sweep_that_the_report_reads(tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=demo",
        "hydra/launcher=local",
        "seed=0,1",
        f"hydra.sweep.dir={sweep_dir}",
        "trainer.max_steps=2",
        "trainer.num_workers=0",
        "trainer.batch_size=4",
        "loss.num_points=256",
    ]
    env = {**os.environ, "EOMT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # one job at a time on a CPU-only machine, a line as each starts and ends, then eomt.report's table
    lines = [line for line in done.stdout.splitlines() if line.startswith(("[1/2]", "[2/2]"))]
    assert [line.split()[1] for line in lines] == [
        "started",
        lines[1].split()[1],
        "started",
        lines[3].split()[1],
    ]
    assert "0_" in lines[1] and "finished in" in lines[1] and "PQ " in lines[1] and "FPS " in lines[1]
    assert "2 of 2 jobs finished" in done.stdout and "| run | task | PQ |" in done.stdout
    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = [p.name for p in run_dirs]  # "<job>_<overrides>": the job number, then what was set
    assert len(names) == 2 and names[0].startswith("0_") and names[1].startswith("1_")
    assert "seed=0" in names[0] and "seed=1" in names[1]
    for run in run_dirs:
        assert list((run / "checkpoints").glob("step_*.pt")), f"{run.name} saved no checkpoint"
        events = EventAccumulator(str(run))
        events.Reload()
        assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams"), (
            f"{run.name} logged no HParams row (eomt.tb_hparams.log_hparams at the end of training)"
        )
    runs = report.find_runs(sweep_dir)
    assert [r.name for r in runs] == names
    assert all(r.task == "panoptic" and "PQ" in r.metrics for r in runs)
    table = report.markdown_table(runs)
    assert all(f"| {name} | panoptic |" in table for name in names)
