"""`hydra/launcher=slurm`: the submitit SLURM launcher, also on clusters without accounting (eomt.slurm_launcher)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from eomt.slurm_launcher import following_jobs_with_squeue


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with following_jobs_with_squeue():
            return super().launch(job_overrides, initial_job_idx)
