"""The Hydra submitit SLURM launcher, also for clusters without job accounting.

submitit follows its jobs with `sacct`. Where accounting is disabled (`AccountingStorageType=
accounting_storage/none`, common on small clusters) every poll fails: it prints "Slurm accounting
storage is disabled" plus a warning, all through the sweep, and a job that dies without writing its
result is never seen to end, so the launching command waits forever. There this launcher follows the
jobs with `squeue` instead (`following_jobs_with_squeue`); everything else is the plugin's. Hydra only
loads launchers from the `hydra_plugins` package: hydra_plugins/eomt_slurm_launcher holds the class that
`hydra/launcher=slurm` selects.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

LEFT_QUEUE = "LEFT_QUEUE"  # a job squeue no longer lists has ended; its result file tells how


def accounting_enabled() -> bool:
    """False only when `scontrol show config` says accounting is off (True when it cannot tell)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip() != "accounting_storage/none"
    return True


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's job watcher reading `squeue` (this user's jobs, finished ones included) instead of `sacct`."""

    def _make_command(self) -> list[str] | None:
        if not self._registered - self._finished:
            return None
        return ["squeue", "--me", "--noheader", "--states=all", "--array", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)  # sacct's layout: a header, then rows
        for job_id in self._registered - self._finished - info.keys():
            info[job_id] = {"JobID": job_id, "State": LEFT_QUEUE, "NodeList": ""}
        return info


@contextmanager
def following_jobs_with_squeue() -> Iterator[None]:
    """While inside, submitit's SLURM jobs are followed with squeue (where accounting is off; else as is)."""
    if accounting_enabled():
        yield
        return
    log.info("SLURM accounting is disabled on this cluster: following the jobs with squeue")
    default = SlurmJob.watcher
    SlurmJob.watcher = SqueueWatcher(delay_s=default._delay_s)
    try:
        yield
    finally:
        SlurmJob.watcher = default
