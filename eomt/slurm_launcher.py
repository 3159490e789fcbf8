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
import time
from collections.abc import Iterator
from contextlib import contextmanager

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

LEFT_QUEUE = "LEFT_QUEUE"  # a job squeue has not listed for SETTLE_S has ended; its result file tells how
# States in which submitit waits on; any other state ends the job for it (submitit's Job.done).
ACTIVE_STATES = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED"}
# A job that requeues itself (time limit, preemption: submitit's checkpointing) shows a failed or cancelled
# state for a moment on its way back to PENDING, and a busy controller may leave a job out of one listing;
# such a state, or the absence, counts once it has held this long.
SETTLE_S = 60.0


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
    """submitit's job watcher reading `squeue` (this user's jobs, finished ones included) instead of `sacct`.

    A state other than COMPLETED that ends the job, or the job missing from the listing, is reported as
    REQUEUED until it has held `SETTLE_S` (submitit never looks at a job again once it has seen it end).
    """

    def __init__(self, delay_s: int = 60):
        super().__init__(delay_s=delay_s)
        self._ended_since: dict[str, float] = {}

    def _make_command(self) -> list[str] | None:
        if not self._registered - self._finished:
            return None
        return ["squeue", "--me", "--noheader", "--states=all", "--array", "--format=%i|%T|%N"]

    def _is_array_parent(self, job_id: str) -> bool:
        return any(other.startswith(f"{job_id}_") for other in self._registered)

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)  # sacct's layout: a header, then rows
        for job_id in self._registered - self._finished - info.keys():
            info[job_id] = {"JobID": job_id, "State": LEFT_QUEUE, "NodeList": ""}
        now = time.monotonic()
        for job_id, row in info.items():
            if job_id not in self._registered or self._is_array_parent(job_id):
                continue  # another job of this user's; an array's own id (squeue lists its tasks)
            state = (row.get("State") or "UNKNOWN").split()[0].upper()  # e.g. "CANCELLED by 0"
            if state in ACTIVE_STATES or state == "COMPLETED":
                self._ended_since.pop(job_id, None)
            elif now - self._ended_since.setdefault(job_id, now) < SETTLE_S:
                if self._ended_since[job_id] == now:
                    log.info(
                        "job %s shows %s: waiting %.0f s to see whether it requeues", job_id, state, SETTLE_S
                    )
                info[job_id] = {**row, "State": "REQUEUED"}  # perhaps on its way back to the queue
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
