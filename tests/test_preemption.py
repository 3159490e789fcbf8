"""The preemption path: a signal -> every rank stops at the same step -> checkpoint -> requeue -> resume."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
import torch
import torch.multiprocessing as mp
from conftest import stepped

from eomt import distributed, preemption
from eomt.preemption import (
    REQUEUE_ENV,
    PreemptionHandler,
    StopReason,
    TrainingStopped,
    ignore_in_dataloader_worker,
)

ROOT = Path(__file__).resolve().parents[1]


def agreed_reason(handler: PreemptionHandler) -> StopReason:
    """The reason all ranks agreed to stop for, as the loop sees it in `check()` (NONE: no stop)."""
    try:
        handler.check()
    except TrainingStopped as stop:
        return stop.reason
    return StopReason.NONE


@pytest.fixture
def handler():
    sigchld = signal.getsignal(signal.SIGCHLD)  # a stop leaves it quiet for good: give PyTorch's back
    h = PreemptionHandler()
    h.install()
    yield h
    h.uninstall()
    signal.signal(signal.SIGCHLD, sigchld)


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments instead of talking to SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for var in ("SUBMITIT_EXECUTOR", REQUEUE_ENV, "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_signals_only_set_a_flag_until_the_step_boundary(handler):
    assert not handler.should_stop()
    signal.raise_signal(signal.SIGUSR2)  # would kill the process without the handler
    assert handler.should_stop()
    assert agreed_reason(handler) == StopReason.REQUEUE
    assert handler.should_stop()  # stays decided


def test_sigterm_stops_without_asking_for_requeue(handler, fake_scontrol, monkeypatch):
    monkeypatch.setenv(REQUEUE_ENV, "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signal.raise_signal(signal.SIGTERM)
    assert agreed_reason(handler) == StopReason.STOP
    with pytest.raises(SystemExit) as exit_info:
        handler.finish("ckpt/step_00000007.pt")
    assert exit_info.value.code == 0
    assert not fake_scontrol.exists()


def test_usr_signal_requeues_a_plain_sbatch_job_that_asked_for_it(handler, fake_scontrol, monkeypatch):
    monkeypatch.setenv(REQUEUE_ENV, "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signal.raise_signal(signal.SIGUSR1)
    assert handler.should_stop()
    with pytest.raises(SystemExit) as exit_info:
        handler.finish("ckpt/step_00000007.pt")
    assert exit_info.value.code == 0
    assert fake_scontrol.read_text().split() == ["requeue", "4242"]


def test_no_requeue_unless_the_job_asked_for_it(handler, fake_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    signal.raise_signal(signal.SIGUSR2)
    assert handler.should_stop()
    with pytest.raises(SystemExit):
        handler.finish()
    assert not fake_scontrol.exists()


def test_finish_without_a_signal_does_nothing(handler, fake_scontrol, monkeypatch):
    monkeypatch.setenv(REQUEUE_ENV, "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert not handler.should_stop()
    handler.finish()
    assert not fake_scontrol.exists()


def test_inside_submitit_the_kept_handler_requeues_after_the_checkpoint(fake_scontrol, monkeypatch):
    calls = []

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        calls.append(signum)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    handler = PreemptionHandler()
    handler.install()
    try:
        signal.raise_signal(signal.SIGUSR2)
        assert calls == []  # the signal itself only sets the flag: no requeue before the checkpoint
        assert handler.should_stop()
        with pytest.raises(SystemExit):
            handler.finish()
        assert calls == [signal.SIGUSR2]
    finally:
        handler.uninstall()
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # given back
        signal.signal(signal.SIGUSR2, previous)


def test_inside_submitit_sigterm_ends_without_requeue(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    handler = PreemptionHandler()
    handler.install()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert handler.should_stop()
        with pytest.raises(SystemExit) as exit_info:
            handler.finish()
        assert exit_info.value.code == 0 and calls == []
    finally:
        handler.uninstall()
        signal.signal(signal.SIGUSR2, previous)


def test_first_ctrl_c_stops_at_the_boundary_with_130_and_a_second_aborts(handler, capsys):
    signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: only a flag
    assert agreed_reason(handler) == StopReason.INTERRUPT
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_info:
        handler.finish("run/checkpoints/step_00000003.pt")
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "stopped by SIGINT: checkpoint saved to run/checkpoints/step_00000003.pt; "
        "run the same command again to resume from it"
    )


class _Batches:
    """An iterator standing in for a DataLoader's: `fail` makes it raise as for dead workers."""

    def __init__(self, fail=False, error=None):
        self.calls = 0
        self.error = error or (
            RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly") if fail else None
        )

    def __next__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.calls


def test_next_batches_fetches_nothing_once_a_stop_is_pending(handler):
    batches = _Batches()
    assert handler.next_batches(batches, 2) == [1, 2]
    signal.raise_signal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stop:
        handler.next_batches(batches, 2)
    assert batches.calls == 2  # the workers may be dead: not asked again
    assert stop.value.reason == StopReason.STOP  # agreed: the loop saves and finishes


def test_next_batches_turns_dead_workers_into_a_stop_only_after_a_signal(handler):
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        handler.next_batches(_Batches(fail=True), 1)  # no signal: a real failure
    handler._received, handler._received_signal = StopReason.STOP, signal.SIGTERM  # arrived mid-fetch
    with pytest.raises(TrainingStopped):
        handler.next_batches(_Batches(fail=True), 1)


def test_a_broken_link_to_a_dying_worker_is_a_stop_if_the_signal_follows(handler, monkeypatch):
    """The worker dies of the SIGTERM before this process runs its handler for it: the read of the
    batch it was handing over fails with a reset connection, which PyTorch passes on as it is."""
    monkeypatch.setattr(preemption, "SIGNAL_GRACE_S", 0.3)
    reset = ConnectionResetError(104, "Connection reset by peer")
    with pytest.raises(ConnectionResetError):
        handler.next_batches(_Batches(error=reset), 1)  # no signal within the grace: a real failure
    with pytest.raises(ValueError):
        handler.next_batches(_Batches(error=ValueError("bad sample")), 1)  # not a worker's death
    monkeypatch.setattr(preemption, "SIGNAL_GRACE_S", 5.0)
    late_signal = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
    late_signal.start()
    try:
        with pytest.raises(TrainingStopped):
            handler.next_batches(_Batches(error=reset), 1)
    finally:
        late_signal.join()


def test_a_stop_sets_aside_pytorchs_worker_death_handler_until_exit(handler):
    calls = []
    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: calls.append(signum))
    try:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGCHLD)  # a worker died of the same SIGTERM: must not raise mid-step
        handler.uninstall()
        signal.raise_signal(signal.SIGCHLD)  # nor from the cleanup on the way out
        assert calls == []
        assert signal.getsignal(signal.SIGTERM) != handler._on_signal  # the others are given back
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_dataloader_workers_ignore_the_scheduler_signals():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        ignore_in_dataloader_worker(0)
        signal.raise_signal(signal.SIGUSR2)  # the default action would end this process
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- several ranks agree ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_loop(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed.init("cpu")
    stopped_at = {}
    handler = PreemptionHandler()
    handler.install()
    for step in range(1, 20):
        if rank == 1 and step == 3:
            signal.raise_signal(signal.SIGUSR2)  # only rank 1 is told, like submitit's rank-0-only USR2
        if reason := agreed_reason(handler):
            stopped_at["check"] = (step, int(reason))
            break
    handler.uninstall()
    # A stop that reaches rank 0 while it fetches: no rank runs the step (its collectives would hang).
    handler = PreemptionHandler()
    handler.install()
    fetched = [handler.next_batches(iter(range(10)), 2)]
    if rank == 0:
        signal.raise_signal(signal.SIGTERM)
    try:
        fetched.append(handler.next_batches(iter(range(10)), 2))
    except TrainingStopped as stop:
        stopped_at["next_batches"] = [[*fetched, None], int(stop.reason)]
    handler.uninstall()
    distributed.cleanup()
    Path(out, f"rank{rank}.json").write_text(json.dumps(stopped_at))


@pytest.mark.slow
def test_all_ranks_stop_at_the_same_step_when_one_rank_gets_the_signal(tmp_path):
    mp.spawn(_rank_loop, args=(_free_port(), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert results[0] == {
        "check": [3, int(StopReason.REQUEUE)],
        "next_batches": [[[0, 1], None], int(StopReason.STOP)],
    }


# --- a real submitit job is requeued and resumes ------------------------------------------------
class ResumableCounter:
    """A checkpointable submitit job shaped like the Hydra launcher: `checkpoint()` resubmits it as is."""

    def __call__(self, workdir: str, extra_steps: int) -> dict:
        work = Path(workdir)
        state_file = work / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "starts": 0}
        start_step = state["step"]
        state["starts"] += 1
        state_file.write_text(json.dumps(state))
        handler = PreemptionHandler()
        handler.install()
        (work / f"pid{state['starts']}").write_text(str(os.getpid()))  # the test signals this process
        step = start_step
        last = start_step + extra_steps if state["starts"] > 1 else 10**9  # first start: run until told
        while step < last:
            step += 1
            time.sleep(0.01)
            if handler.should_stop():
                state_file.write_text(json.dumps({"step": step, "starts": state["starts"]}))  # "checkpoint"
                handler.finish()
                return {"finished": False}
        return {"finished": True, "resumed_from": start_step, "step": step, "starts": state["starts"]}

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _wait_for(path: Path, job, what: str) -> str:
    deadline = time.monotonic() + 120
    while not path.exists():
        if job.done():
            pytest.fail(f"the job ended before {what}: {job.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within 120 s")
        time.sleep(0.1)
    return path.read_text()


@pytest.mark.slow
def test_submitit_local_job_is_requeued_by_submitit_and_resumes(tmp_path):
    import submitit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    work = tmp_path / "work"
    work.mkdir()
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(ResumableCounter(), str(work), 5)
    first_pid = int(_wait_for(work / "pid1", job, "the first start"))
    os.kill(first_pid, signal.SIGUSR2)  # what the controller sends `signal_delay_s` before the limit
    _wait_for(work / "pid2", job, "the requeued start")
    result = job.result()
    saved = json.loads((work / "state.json").read_text())
    assert result["finished"] and result["starts"] == 2
    assert result["resumed_from"] == saved["step"] > 0
    assert result["step"] == result["resumed_from"] + 5


# --- train.py: signal -> checkpoint -> scontrol requeue -> the second run resumes ---------------
def _train_cmd(run_dir: Path, max_steps: int, workers: int = 0) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=demo",
        f"hydra.run.dir={run_dir}",
        f"trainer.num_workers={workers}",
        "trainer.batch_size=4",
        "eval.every_epochs=0",
        "loss.num_points=256",
        f"trainer.max_steps={max_steps}",
        "trainer.ckpt_every_steps=100000",
        "trainer.log_every_steps=1",
    ]


@pytest.mark.slow
def test_train_py_checkpoints_on_the_signal_requeues_and_resumes(tmp_path, fake_scontrol):
    env = {**os.environ, REQUEUE_ENV: "1", "SLURM_JOB_ID": "777", "EOMT_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    output = tmp_path / "first_run.txt"
    with output.open("w") as out:
        proc = subprocess.Popen(
            _train_cmd(run_dir, 10**6), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while not stepped(run_dir):
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "train.py did not finish a step within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR2)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output.read_text()
    assert fake_scontrol.read_text().split() == ["requeue", "777"]
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1
    stopped_at = torch.load(checkpoints[0], weights_only=True)["step"]
    assert 0 < stopped_at < 10**6

    # The requeued job: the same command in the same run directory.
    second = subprocess.run(
        _train_cmd(run_dir, stopped_at + 2), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout + second.stderr
    log_text = (run_dir / "train.log").read_text()
    assert f"at step {stopped_at}" in log_text  # "resumed from ... at step N"
    final = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    assert torch.load(final, weights_only=True)["step"] == stopped_at + 2


def _start_and_wait_for_the_loop(cmd, run_dir: Path, env: dict, stderr_path: Path) -> subprocess.Popen:
    """Start train.py in its own process group; return once its training loop has finished a step."""
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while not stepped(run_dir):
        assert proc.poll() is None, stderr_path.read_text()
        assert time.monotonic() < deadline, "train.py did not finish a step within 300 s"
        time.sleep(0.2)
    time.sleep(1.0)  # a few steps in, the workers busy
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_to_the_process_group_with_workers_saves_and_resumes(tmp_path, sig, code):
    """What `scancel` / a cluster's preemption / Ctrl-C deliver: the DataLoader workers get it too."""
    env = {**os.environ, "EOMT_CACHE": str(tmp_path / "cache")}
    env.pop(REQUEUE_ENV, None)
    run_dir, stderr_path = tmp_path / "run", tmp_path / "stderr.txt"
    proc = _start_and_wait_for_the_loop(_train_cmd(run_dir, 10**6, workers=2), run_dir, env, stderr_path)
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = stderr_path.read_text()
    assert proc.returncode == code, stderr
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1
    stopped_at = torch.load(checkpoints[0], weights_only=True)["step"]
    assert 0 < stopped_at < 10**6
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by {sig.name}: checkpoint saved to {checkpoints[0]}; run the same command again to resume from it"
    )
    assert "Traceback" not in stderr

    second = subprocess.run(
        _train_cmd(run_dir, stopped_at + 1, workers=2),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr
    assert f"{checkpoints[0]} at step {stopped_at}" in (run_dir / "train.log").read_text()
    assert (
        torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)["step"]
        == stopped_at + 1
    )


_HANDOVER_LOOP = """
import torch
from torch.utils.data import DataLoader, Dataset
from eomt.preemption import PreemptionHandler, TrainingStopped, ignore_in_dataloader_worker

class Tensors(Dataset):  # every batch reaches the main process as shared memory, one fd per tensor
    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        return torch.zeros(32, 32)

handler = PreemptionHandler()
handler.install()
batches = iter(DataLoader(Tensors(), batch_size=2, num_workers=2, worker_init_fn=ignore_in_dataloader_worker))
try:
    for step in range(10**6):
        handler.next_batches(batches, 1)
        if step == 20:
            print("looping", flush=True)
        handler.check()
except TrainingStopped:
    handler.finish()
finally:
    handler.uninstall()
"""


@pytest.mark.slow
def test_a_stop_that_kills_workers_mid_handover_ends_with_the_stop_line(tmp_path):
    """SIGTERM to the group at arbitrary moments of the loader's traffic: a worker may die while the
    main process reads its batch (a reset connection, before this process ran its own handler), or
    after the loop has stopped (PyTorch's SIGCHLD handler raising from the loader's cleanup)."""
    script = tmp_path / "loop.py"
    script.write_text(_HANDOVER_LOOP)
    delays = random.Random(0)
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout.readline() == "looping\n"
            time.sleep(delays.uniform(0.0, 0.3))
            os.killpg(proc.pid, signal.SIGTERM)
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: no checkpoint written"), stderr


@pytest.mark.slow
def test_train_py_resumes_past_an_unreadable_newest_checkpoint_and_clears_interrupted_writes(tmp_path):
    env = {**os.environ, "EOMT_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    cmd = [*_train_cmd(run_dir, 2), "trainer.ckpt_every_steps=1"]
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    folder = run_dir / "checkpoints"
    (folder / "step_00000002.pt").write_bytes(bytes(1000))  # zero-filled
    leftover = folder / ".step_00000003.pt.x1y2.tmp"  # a write killed half-way
    leftover.write_bytes(b"partial")
    done = subprocess.run(
        [*_train_cmd(run_dir, 3), "trainer.ckpt_every_steps=1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    log_text = (run_dir / "train.log").read_text()
    assert "step_00000002.pt is unreadable or not a PyTorch checkpoint" in log_text
    assert f"resumed from {folder / 'step_00000001.pt'} at step 1" in log_text
    assert (folder / "step_00000002.pt.corrupt").read_bytes() == bytes(1000)  # kept for a look
    assert not leftover.exists()
    assert torch.load(folder / "step_00000003.pt", weights_only=True)["step"] == 3


def test_ctrl_c_twice_aborts_at_once(tmp_path):
    """The second Ctrl-C does not wait for the step boundary (here: a loop that never reaches one)."""
    code = (
        "import signal, time\n"
        "from eomt.preemption import PreemptionHandler\n"
        "h = PreemptionHandler(); h.install()\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('aborted', h.stop_requested, flush=True)\n"
        "    raise SystemExit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None  # the first one only asks for a stop at the boundary
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and out.strip() == "aborted True"


# --- the plain sbatch script ------------------------------------------------------------------
def test_sbatch_script_requeues_itself_and_starts_one_rank_per_task_with_srun(tmp_path, monkeypatch):
    script = (ROOT / "slurm" / "train.sh").read_text()
    directives = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {
        "--signal=USR2@300",
        "--requeue",
        "--open-mode=append",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
    } <= directives
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    (bin_dir / "srun").write_text(
        f'#!/bin/sh\necho "$EOMT_REQUEUE|$SRUN_CPUS_PER_TASK|$PWD|$*" > "{record}"\n'
    )
    (bin_dir / "srun").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_JOB_ID": "55",
        "EOMT_PYTHON": "python3",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "slurm" / "train.sh"), "experiment=demo", "name=my run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    requeue, cpus, cwd, args = record.read_text().strip().split("|")
    assert (requeue, cpus, cwd) == ("1", "16", str(ROOT))
    assert args == "--kill-on-bad-exit=1 python3 train.py experiment=demo name=my run"


def test_submitit_signals_that_only_log_are_ignored_silently(monkeypatch):
    """submitit's SIGTERM/SIGCONT handler logs from inside the signal handler ("reentrant call" tracebacks)."""
    from submitit.core.job_environment import SignalHandler

    submitit_handler = SignalHandler(env=None, job_paths=None, delayed=None)
    logged = []
    monkeypatch.setattr(submitit_handler, "_logger", type("L", (), {"warning": logged.append})())
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGCONT)}
    try:
        for sig in saved:
            signal.signal(sig, submitit_handler.bypass)
        handler = PreemptionHandler()
        handler.install()
        os.kill(os.getpid(), signal.SIGCONT)
        handler.uninstall()
        os.kill(os.getpid(), signal.SIGTERM)  # submitit's choice stays: the process keeps running
        os.kill(os.getpid(), signal.SIGCONT)
        assert logged == []
        assert agreed_reason(handler) == StopReason.NONE
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_worker_death_arriving_with_the_stop_signal_does_not_raise(handler):
    """SIGTERM and a worker's SIGCHLD pending together: SIGTERM's handler (run first) sets PyTorch's
    SIGCHLD handler aside; the pending SIGCHLD must then find a handler, not SIG_DFL."""
    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # stands for PyTorch's
    both = {signal.SIGTERM, signal.SIGCHLD}
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGCHLD)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # both arrive at once
        assert handler.stop_requested
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
        signal.signal(signal.SIGCHLD, previous)
