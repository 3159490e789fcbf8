"""A sweep's jobs on this machine, a bounded number at a time, reported as they start and end.

`hydra/launcher=local` (hydra_plugins/eomt_slurm_launcher/local_launcher.py) runs each job of
`python train.py -m ...` as a local subprocess through submitit, like `hydra/launcher=slurm` does on a
cluster. Jobs that ran all at once on two cores timed each other (their FPS spread 3x) and the command
printed nothing for minutes, so here:
- at most `max_parallel` jobs run at once: by default one per GPU (each job sees only its own GPUs
  through CUDA_VISIBLE_DEVICES) and one on a machine without GPUs;
- a line is printed as each job starts (its run directory, its log) and ends (its main metric and FPS,
  or the last line of its error);
- the sweep closes with eomt.report's comparison table;
- Ctrl-C stops the running jobs at a step boundary with a checkpoint (each job's train.py handles
  the terminal's SIGINT; the launcher sends SIGTERM where it alone got one), and running the same
  command again resumes them. submitit's job controllers would turn the terminal's Ctrl-C into a
  second SIGINT and a SIGKILL a second later, so they are started with SIGINT ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from hydra.core.utils import JobReturn, JobStatus
from submitit.core.utils import FailedJobError, UncompletedJobError

from eomt import report
from eomt.errors import ConfigError, DataError

POLL_S = 1.0


def gpus_per_job(requested: int | None, tasks_per_node: int, available: int) -> int:
    """GPUs each job gets: `requested`, or (None) one per task where the machine has enough, else 0."""
    if requested is not None:
        return requested
    return tasks_per_node if available >= tasks_per_node else 0


def visible_gpus(environ: dict[str, str], device_count: int) -> list[int]:
    """The GPU indices jobs may be given: CUDA_VISIBLE_DEVICES's (when numeric) or 0..count-1."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and all(part.strip().isdigit() for part in listed.split(",") if part.strip()):
        return [int(part) for part in listed.split(",") if part.strip()][:device_count]
    return list(range(device_count))


def default_parallel(per_job: int, gpus: int) -> int:
    """One job per `per_job` GPUs, or one job at a time without GPUs."""
    return max(1, gpus // per_job) if per_job else 1


@dataclass
class _Running:
    num: int
    name: str
    run_dir: Path
    job: Any  # submitit.local.local.LocalJob
    gpus: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _last_error_line(job: Any) -> str:
    """The last line of the job's stderr that is not a traceback frame (e.g. "error: ... ; pass ...")."""
    text = job.stderr() or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~", "srun:", "submitit")) and "Traceback" not in line:
            return line[:300]
    return "no error output"


def describe_result(run_dir: Path) -> str:
    """ "PQ 60.57, FPS 3.10" from the run's metrics.json (FPS under load marked *), or why there is none."""
    path = run_dir / report.METRICS_FILE
    if not path.is_file():
        return "no metrics.json (not evaluated)"
    try:
        run = report.load_run(path, run_dir.name)
    except DataError as e:
        return str(e)
    parts = []
    if run.primary_metric:
        parts.append(f"{run.primary_metric} {report.format_number(run.metrics[run.primary_metric])}")
    if run.fps is not None:
        parts.append(f"FPS {report.format_number(run.fps)}" + (" (under load)" if run.fps_under_load else ""))
    return ", ".join(parts) or "metrics.json holds no metric"


def run_sweep(
    *,
    executor: submitit.LocalExecutor,
    submit: Callable[[int, Sequence[str]], Any],
    jobs: Sequence[tuple[int, Sequence[str], str, Path]],
    sweep_dir: Path,
    per_job: int,
    gpus: Sequence[int],
    max_parallel: int | None,
    echo: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[JobReturn]:
    """Run `jobs` ((number, overrides, name, run directory), in order), `max_parallel` at a time.

    `submit(num, overrides)` submits one job with `executor` (whose `visible_gpus` is set for it first)
    and returns the submitit job. Returns one JobReturn per job, in order; where a job failed, ends
    with one error line naming the failed jobs (their errors and logs were printed as they ended)
    and exit code 1."""
    parallel = max_parallel or default_parallel(per_job, len(gpus))
    if per_job and len(gpus) < per_job:
        raise ConfigError(
            f"each job needs {per_job} GPU(s) (hydra.launcher.gpus_per_node) and this machine shows "
            f"{len(gpus)}; set hydra.launcher.gpus_per_node=0 to run on the CPU"
        )
    parallel = min(parallel, max(1, len(gpus) // per_job)) if per_job else parallel
    where = f"{per_job} GPU(s) each" if per_job else "on the CPU"
    echo(f"sweep {sweep_dir}: {len(jobs)} jobs, {parallel} at a time, {where}")
    pending = list(jobs)
    free = list(gpus)
    running: list[_Running] = []
    results: dict[int, JobReturn] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                num, overrides, name, run_dir = pending.pop(0)
                mine, free = free[:per_job], free[per_job:]
                executor.update_parameters(visible_gpus=tuple(mine))
                job = _submit_ignoring_sigint(submit, num, overrides)
                running.append(_Running(num, name, run_dir, job, mine))
                on = f" on GPU {','.join(map(str, mine))}" if mine else ""
                echo(f"[{num + 1}/{len(jobs)}] started {name}{on}: {run_dir} (log {job.paths.stdout})")
            time.sleep(POLL_S)
            for entry in [r for r in running if r.job.done()]:
                running.remove(entry)
                free += entry.gpus
                results[entry.num] = _finish(entry, len(jobs), echo)
    except KeyboardInterrupt:
        echo(f"interrupted: stopping {len(running)} running job(s) at a step boundary, with a checkpoint")
        for entry in running:
            _stop(entry.job)
        while any(not entry.job.done() for entry in running):  # a second Ctrl-C ends the wait
            time.sleep(POLL_S)
        echo("stopped; run the same command again to resume the sweep")
        raise SystemExit(130) from None
    failed = [name for num, _, name, _ in jobs if results[num].status == JobStatus.FAILED]
    echo(f"sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs finished")
    try:
        table, notes = report.summarize(sweep_dir)
        echo(table + ("\n" + "\n".join(notes) if notes else ""))
    except DataError as e:
        echo(f"no comparison table: {e}")
    if failed:  # one line, not Hydra's traceback of its sweeper re-raising the first failure
        print(
            f"error: {len(failed)} of {len(jobs)} jobs failed ({', '.join(failed)}); "
            "their errors and logs are named above",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)
    return [results[num] for num, *_ in jobs]


def _submit_ignoring_sigint(submit: Callable[[int, Sequence[str]], Any], num: int, overrides: Sequence[str]):
    """The job's controller process inherits SIGINT ignored (train.py installs its own handler)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return submit(num, overrides)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(job: Any) -> None:
    """SIGTERM to the job's controller, which passes it on to the job: save, then stop."""
    try:
        os.kill(int(job.job_id), signal.SIGTERM)  # a local job's id is its controller's pid
    except (ProcessLookupError, ValueError):
        pass  # already ended


def _finish(entry: _Running, total: int, echo: Callable[[str], None]) -> JobReturn:
    took = _duration(time.monotonic() - entry.started)
    prefix = f"[{entry.num + 1}/{total}] {entry.name}"
    try:
        ret = entry.job.results()[0]
        reason = None if ret.status == JobStatus.COMPLETED else repr(ret._return_value)  # raised in the job
    except (FailedJobError, UncompletedJobError):  # the job's process failed (e.g. exit 1 after one line)
        ret, reason = JobReturn(status=JobStatus.FAILED), _last_error_line(entry.job)
    if reason is None:
        echo(f"{prefix} finished in {took}: {describe_result(entry.run_dir)}")
    else:
        ret.status = JobStatus.FAILED
        echo(f"{prefix} FAILED after {took}: {reason} (log {entry.job.paths.stderr})")
    return ret


def cuda_device_count() -> int:
    import torch  # here: Hydra imports the launcher plugin at every start, also where no sweep runs

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def environment_gpus() -> list[int]:
    return visible_gpus(dict(os.environ), cuda_device_count())
