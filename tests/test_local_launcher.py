"""Local sweeps one can watch: a bounded number of jobs at once, each on its own GPUs, a line as each
starts and ends, and the comparison table at the end."""

import json
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.core.utils import JobReturn, JobStatus
from submitit.core.utils import FailedJobError

from eomt import local_launcher


class FakeJob:
    """A submitted job that is done after `polls` calls of done()."""

    def __init__(self, clock: dict, run_dir: Path, polls: int, fail: str | None, gpus: tuple):
        self.clock, self.run_dir, self.polls, self.fail, self.gpus = clock, run_dir, polls, fail, gpus
        self.paths = SimpleNamespace(stdout=run_dir / "log.out", stderr=run_dir / "log.err")

    def done(self) -> bool:
        self.polls -= 1
        if self.polls > 0:
            return False
        if not self.fail and not (self.run_dir / "metrics.json").exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {"task": "panoptic", "metrics": {"PQ": 60.567}, "fps": 3.1, "fps_under_load": False}
            (self.run_dir / "metrics.json").write_text(json.dumps(record))
        return True

    def results(self):
        if self.fail:
            raise FailedJobError("Job failed: long submitit text")
        return [JobReturn(status=JobStatus.COMPLETED)]

    def stderr(self) -> str:
        return f'Traceback (most recent call last):\n  File "x.py", line 1\n{self.fail}\n'


class FakeExecutor:
    def __init__(self):
        self.parameters = {}

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)


def sweep(tmp_path, names, polls, fail=(), gpus=(), per_job=0, max_parallel=None, echo=None):
    executor, lines, running, peak = FakeExecutor(), [], [], []
    clock = {}
    jobs = [(i, [f"seed={i}"], name, tmp_path / name) for i, name in enumerate(names)]
    submitted = []

    def submit(num, overrides):
        job = FakeJob(
            clock,
            tmp_path / names[num],
            polls[num],
            "error: bad thing" if num in fail else None,
            executor.parameters["visible_gpus"],
        )
        submitted.append(job)
        active = [j for j in submitted if j.polls > 0]
        peak.append(len(active))
        running.append({g for j in active for g in j.gpus})
        assert sum(len(j.gpus) for j in active) == len({g for j in active for g in j.gpus})  # no GPU shared
        return job

    results = local_launcher.run_sweep(
        executor=executor,
        submit=submit,
        jobs=jobs,
        sweep_dir=tmp_path,
        per_job=per_job,
        gpus=list(gpus),
        max_parallel=max_parallel,
        echo=echo or lines.append,
    )
    return results, lines, max(peak), submitted


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(local_launcher, "POLL_S", 0.0)


def test_one_job_at_a_time_without_gpus_with_a_line_per_start_and_end_and_the_table(tmp_path):
    results, lines, peak, _ = sweep(tmp_path, ["0_a", "1_b", "2_c"], [3, 1, 2])
    assert peak == 1
    assert [r.status for r in results] == [JobStatus.COMPLETED] * 3
    assert lines[0] == f"sweep {tmp_path}: 3 jobs, 1 at a time, on the CPU"
    events = [line.split(" ", 2)[1] for line in lines[1:7]]
    assert events == [
        "started",
        "0_a",
        "started",
        "1_b",
        "started",
        "2_c",
    ]  # each ends before the next starts
    assert "[1/3] 0_a finished in 0s: PQ 60.57, FPS 3.10" in lines
    assert lines[7] == f"sweep {tmp_path}: 3 of 3 jobs finished"
    assert "| 2_c | panoptic | 60.57 | 3.10 | - | - |" in lines[8]  # eomt.report's table closes the sweep


def test_one_job_per_gpu_each_on_its_own_gpu(tmp_path):
    _, lines, peak, jobs = sweep(
        tmp_path, [f"{i}_x" for i in range(5)], [4, 2, 6, 1, 1], gpus=[0, 1], per_job=1
    )
    assert peak == 2 and "2 at a time, 1 GPU(s) each" in lines[0]
    assert all(len(job.gpus) == 1 for job in jobs)
    assert any("started 0_x on GPU 0" in line for line in lines)
    assert any("started 1_x on GPU 1" in line for line in lines)


def test_max_parallel_is_settable(tmp_path):
    _, lines, peak, _ = sweep(tmp_path, [f"{i}_x" for i in range(4)], [3, 3, 3, 3], max_parallel=3)
    assert peak == 3 and "3 at a time" in lines[0]


def test_a_failed_job_is_one_line_the_others_still_run_and_the_sweep_ends_in_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        sweep(tmp_path, ["0_ok", "1_bad", "2_ok"], [1, 1, 1], fail={1}, echo=(lines := []).append)
    assert stop.value.code == 1
    failed = next(line for line in lines if "FAILED" in line)
    assert failed == f"[2/3] 1_bad FAILED after 0s: error: bad thing (log {tmp_path / '1_bad' / 'log.err'})"
    assert "[3/3] 2_ok finished in 0s: PQ 60.57, FPS 3.10" in lines  # the others still ran
    assert f"sweep {tmp_path}: 2 of 3 jobs finished" in lines
    assert "| 2_ok | panoptic | 60.57 |" in lines[-1]  # the table still closes the sweep
    assert (
        capsys.readouterr().err
        == "error: 1 of 3 jobs failed (1_bad); their errors and logs are named above\n"
    )


def test_gpus_per_job_and_visible_gpus():
    assert local_launcher.gpus_per_job(None, 1, 0) == 0  # CPU-only machine
    assert local_launcher.gpus_per_job(None, 2, 4) == 2 and local_launcher.gpus_per_job(0, 1, 8) == 0
    assert local_launcher.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 2) == [2, 3]
    assert local_launcher.visible_gpus({}, 3) == [0, 1, 2]
    assert local_launcher.default_parallel(2, 4) == 2 and local_launcher.default_parallel(0, 0) == 1


def test_too_few_gpus_for_one_job_is_one_line(tmp_path):
    with pytest.raises(local_launcher.ConfigError, match="hydra.launcher.gpus_per_node=0"):
        sweep(tmp_path, ["0_x"], [1], gpus=[0], per_job=2)


def test_ctrl_c_stops_the_running_jobs_with_sigterm_and_exits_130(tmp_path, monkeypatch):
    """The launcher's Ctrl-C: SIGTERM to each running job's controller (train.py saves, then stops)."""
    controllers = []

    class Controller(FakeJob):
        def __init__(self, *args):
            super().__init__(*args)
            self.process = subprocess.Popen(["sleep", "60"])
            self.job_id = str(self.process.pid)
            controllers.append(self)

        def done(self):
            return self.process.poll() is not None

    calls = {"n": 0}

    def sleep(_):
        calls["n"] += 1
        if calls["n"] == 1:
            assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # restored after each submit
            raise KeyboardInterrupt

    monkeypatch.setattr(local_launcher.time, "sleep", sleep)
    lines = []
    with pytest.raises(SystemExit) as stop:
        local_launcher.run_sweep(
            executor=FakeExecutor(),
            submit=lambda num, overrides: Controller({}, tmp_path / "0_x", 1, None, ()),
            jobs=[(0, [], "0_x", tmp_path / "0_x"), (1, [], "1_x", tmp_path / "1_x")],
            sweep_dir=tmp_path,
            per_job=0,
            gpus=[],
            max_parallel=1,
            echo=lines.append,
        )
    assert stop.value.code == 130
    assert len(controllers) == 1 and controllers[0].process.wait(timeout=10) == -signal.SIGTERM
    assert lines[-1] == "stopped; run the same command again to resume the sweep"
