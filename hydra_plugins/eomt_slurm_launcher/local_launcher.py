"""`hydra/launcher=local`: the submitit local launcher, a bounded number of jobs at a time, reported as they
run (eomt.local_launcher); `hydra.launcher.max_parallel` sets how many run at once.

No `from __future__ import annotations` here: Hydra's plugin scan loads this module outside sys.modules,
where a dataclass cannot resolve string annotations."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf
from omegaconf import open_dict

from eomt import local_launcher


@dataclass
class EomtLocalQueueConf(LocalQueueConf):
    _target_: str = "hydra_plugins.eomt_slurm_launcher.local_launcher.LocalLauncher"
    # jobs at once; null: one per GPU (gpus_per_node each), one on a machine without GPUs
    max_parallel: int | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="eomt_local", node=EomtLocalQueueConf(), provider="eomt"
)


class LocalLauncher(submitit_launcher.LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        params = dict(self.params)
        max_parallel = params.pop("max_parallel", None)
        gpus = local_launcher.environment_gpus()
        per_job = local_launcher.gpus_per_job(
            params.get("gpus_per_node"), params["tasks_per_node"], len(gpus)
        )
        executor = submitit.LocalExecutor(folder=params.pop("submitit_folder"))
        executor.update_parameters(
            **{k: v for k, v in params.items() if k in ("timeout_min", "tasks_per_node", "stderr_to_stdout")},
            gpus_per_node=per_job,
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config.hydra.job):
                job_config.hydra.job.num = idx
            subdir = str(job_config.hydra.sweep.subdir)
            jobs.append((idx, list(overrides), subdir, Path(str(job_config.hydra.sweep.dir)) / subdir))

        def submit(num: int, overrides: Sequence[str]) -> Any:
            return executor.submit(
                self, list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()
            )

        return local_launcher.run_sweep(
            executor=executor,
            submit=submit,
            jobs=jobs,
            sweep_dir=sweep_dir,
            per_job=per_job,
            gpus=gpus,
            max_parallel=max_parallel,
        )
