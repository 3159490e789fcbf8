"""The SLURM path against a real scheduler: the local cluster of `slurm/local-cluster.sh` (two virtual nodes).

`.ci/run` starts the cluster before the suite; elsewhere these tests start it themselves when SLURM is
installed, and skip (saying how to get one) when it cannot be started. Runs are `experiment=demo`
sized on CPU; requeued jobs are released after a few seconds (`scontrol update StartTime=now`) instead of
waiting the ~2 minutes SLURM holds them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import stepped

from eomt import report

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
SLURM_DIR = Path(os.environ.get("EOMT_SLURM_DIR", "/tmp/eomt-slurm"))

# Demo-sized runs; one thread per process so that runs on the 2 declared CPUs of a node compare bit for bit.
DEMO = [
    "experiment=demo",
    "trainer.batch_size=4",
    "loss.num_points=256",
    "trainer.log_every_steps=50",
]
NO_EVAL = ["eval.every_epochs=0"]
LIMIT_MIN = 10  # every job's time limit; the time-limit test brings it near while the job runs
WARNING_S = 60  # --signal=USR2@60 / signal_delay_s


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """The environment that reaches the local cluster (SLURM_CONF) and runs this checkout's code."""
    env = {
        **os.environ,
        "SLURM_CONF": str(SLURM_DIR / "slurm.conf"),
        "EOMT_SLURM_DIR": str(SLURM_DIR),
        "EOMT_CACHE": str(tmp_path_factory.mktemp("cache")),
        "EOMT_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_"))]:
        if var != "SLURM_CONF":
            del env[var]
    started = False
    status = subprocess.run(["bash", CLUSTER, "status"], env=env, capture_output=True, text=True)
    if status.returncode != 0:
        if not shutil.which("slurmctld") and os.geteuid() != 0:
            pytest.skip(
                "no local SLURM cluster: slurm-wlm is not installed; run `slurm/local-cluster.sh start` as root"
            )
        start = subprocess.run(
            ["bash", CLUSTER, "start"], env=env, capture_output=True, text=True, timeout=600
        )
        if start.returncode != 0:
            pytest.skip(
                f"the local SLURM cluster cannot be started: {(start.stderr or start.stdout).strip()[-300:]}"
            )
        started = True
    yield env
    cancel_all(env)
    if started:
        subprocess.run(["bash", CLUSTER, "stop"], env=env, capture_output=True, timeout=120)


def sh(env, *cmd: str) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
    return done.stdout


def cancel_all(env) -> None:
    subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], env=env, capture_output=True)


def job_info(env, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge=600 s)."""
    out = sh(env, "scontrol", "show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", out))


_held_since: dict[tuple[str, str], float] = {}  # (job id, its BeginTime) -> when first seen held
REQUEUE_SETTLE_S = 3.0


def release_held(env) -> None:
    """Start requeued jobs soon instead of after SLURM's ~2 minute BeginTime hold (with a fresh time limit).

    Not at once: slurmd refuses a job whose credential was revoked (its previous run killed by the
    requeue) in the same second ("Job credential revoked"), and the job then ends FAILED. SLURM's
    hold is there for that; REQUEUE_SETTLE_S is enough on one machine.
    """
    out = subprocess.run(
        ["squeue", "-h", "-t", "PD", "-o", "%i|%r|%S"], env=env, capture_output=True, text=True
    )
    for line in out.stdout.splitlines():
        job_id, reason, begin = (line.split("|") + ["", ""])[:3]
        if reason.strip() != "BeginTime":
            continue
        since = _held_since.setdefault((job_id, begin), time.monotonic())
        if time.monotonic() - since >= REQUEUE_SETTLE_S:
            update = ["scontrol", "update", f"JobId={job_id}", "StartTime=now", f"TimeLimit={LIMIT_MIN}"]
            subprocess.run(update, env=env, capture_output=True)


def _seconds(runtime: str) -> int:
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def bring_time_limit_near(env, job_id: str) -> None:
    """Move a running job's time limit to 30-90 s from now (SLURM limits are whole minutes).

    SLURM sends the `--signal` warning at its first periodic check (every 30 s) that finds less than
    the warning time + 30 s left (here: at once), and ends the job at a later check past the limit.
    Submitted with such a short limit, the warning would land inside Python's start-up instead.
    """
    elapsed = _seconds(job_info(env, job_id)["RunTime"])
    sh(env, "scontrol", "update", f"JobId={job_id}", f"TimeLimit={(elapsed + WARNING_S + 30) // 60}")


def wait_until(env, what: str, condition, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        release_held(env)
        time.sleep(0.5)


def wait_for_end(env, job_id: str, timeout: float = 400) -> dict[str, str]:
    """The job's final record. A job that requeues itself can show an ended state for a moment
    before SLURM turns it to PENDING, so an ended state counts once it holds 3 s later too."""
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")

    def settled() -> dict[str, str] | None:
        first = job_info(env, job_id)
        if first["JobState"] not in ended:
            return None
        time.sleep(3)
        again = job_info(env, job_id)
        same = (again["JobState"], again["Restarts"]) == (first["JobState"], first["Restarts"])
        return again if same else None

    return wait_until(env, f"the end of job {job_id}", settled, timeout)


def sbatch(env, tmp_path: Path, *args: str, overrides: list[str]) -> tuple[str, Path]:
    """Submit slurm/train.sh with sbatch options `args` (overriding its GPU defaults for CPU)."""
    out = tmp_path / "job.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--mem=0",
        f"--output={out}",
        *args,
        str(ROOT / "slurm" / "train.sh"),
        *DEMO,
        "trainer.device=cpu",
        *overrides,
    ]
    job_id = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return job_id.split(";")[0], out


def hard_kill(job_id: str) -> int:
    """SIGKILL this job's training processes, as a power loss would; returns how many."""
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ and b"train.py" in cmdline and b"srun" not in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    return killed


def loop_running(run_dir: Path) -> bool:
    """The TensorBoard writer is created after the signal handlers: once it exists, signals are caught."""
    return bool(list(run_dir.glob("events.*")))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)["model"]


def text(path: Path) -> str:
    return path.read_text(errors="replace")  # a killed process may leave half a character behind


def log_of(run_dir: Path) -> str:
    return text(run_dir / "train.log")


def without_progress(output: str, lines: int = 60) -> str:
    """The last `lines` lines of a job's output that are not progress-bar updates (a failure message)."""
    kept = [line for line in output.splitlines() if "it/s]" not in line and "s/it]" not in line]
    return "\n".join(kept[-lines:])


def sweep_story(launcher_output: str, sweep_dir: Path) -> str:
    """What the launcher and each submitit job printed, progress bars left out."""
    parts = [f"--- launcher\n{without_progress(launcher_output)}"]
    for path in sorted(sweep_dir.glob(".submitit/*/*_log.*")):
        parts.append(f"--- {path.name}\n{without_progress(text(path), 25)}")
    ctld_log = SLURM_DIR / "log" / "slurmctld.log"
    if ctld_log.is_file():  # what the scheduler did with the jobs: starts, requeues, ends, refusals
        events = ("Requeuing", "Allocate", "_start_job", "_job_complete", "Killing", "revoked", "error")
        lines = [line for line in text(ctld_log).splitlines() if any(e in line for e in events)]
        parts.append("--- slurmctld.log (scheduling events, the last 40)\n" + "\n".join(lines[-40:]))
    return "\n".join(parts)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


# --- 1 + 3: a launcher sweep and a plain sbatch job, both past a time limit ------------------------
TIME_LIMITED = ["trainer.max_steps=400", "trainer.ckpt_every_steps=100000", "trainer.num_workers=0"]


def running_jobs(env) -> list[str]:
    out = sh(env, "squeue", "-h", "-t", "R", "-o", "%i")
    return out.split()


def test_time_limits_requeue_and_resume_to_an_uninterrupted_runs_weights(slurm_env, tmp_path):
    """Both requeue paths past a time limit (USR2 60 s before it), next to an uninterrupted run:

    - `hydra/launcher=slurm`, a two-job sweep: submitit requeues each job; both finish, the sweep
      directory has both runs, and `python -m eomt.report` reads them;
    - `slurm/train.sh`: train.py saves and runs `scontrol requeue`;
    the seed-0 runs of both end with the uninterrupted run's weights, bit for bit.
    """
    env = slurm_env
    sbatch_dir = tmp_path / "sbatch_run"
    job_id, job_out = sbatch(
        env,
        tmp_path,
        "--ntasks-per-node=1",
        f"--time={LIMIT_MIN}",
        f"--signal=USR2@{WARNING_S}",
        overrides=[*TIME_LIMITED, *NO_EVAL, f"hydra.run.dir={sbatch_dir}"],
    )
    sweep_dir = tmp_path / "sweep"
    sweep_out = tmp_path / "sweep.out"
    with sweep_out.open("w") as out:
        sweep = subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "-m",
                *DEMO,
                *TIME_LIMITED,
                "eval.every_epochs=1000",  # evaluated once, at the end, for the report
                "seed=0,1",
                "hydra/launcher=slurm",
                "hydra.launcher.gpus_per_node=0",
                "hydra.launcher.tasks_per_node=1",
                "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.mem_gb=0",
                f"hydra.launcher.timeout_min={LIMIT_MIN}",
                f"hydra.launcher.signal_delay_s={WARNING_S}",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    reference_dir = tmp_path / "reference"
    reference = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *DEMO,
            *TIME_LIMITED,
            *NO_EVAL,
            "trainer.device=cpu",
            f"hydra.run.dir={reference_dir}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def loops_running() -> bool:
            runs = [sbatch_dir, *sweep_dir.glob("[01]_*")]
            return len(runs) == 3 and all(loop_running(d) for d in runs)

        wait_until(env, "all three training loops", loops_running, timeout=300)
        jobs = running_jobs(env)
        assert len(jobs) == 3, jobs
        for job in jobs:
            bring_time_limit_near(env, job)
        wait_until(env, "the end of the sweep", lambda: sweep.poll() is not None, timeout=600)
        info = wait_for_end(env, job_id)
        reference.wait(timeout=600)
    finally:
        for proc in (sweep, reference):
            if proc.poll() is None:
                proc.kill()
    launcher_output = sweep_out.read_text()
    assert sweep.returncode == 0, sweep_story(launcher_output, sweep_dir)
    assert reference.returncode == 0
    assert info["JobState"] == "COMPLETED", text(job_out)[-3000:]

    # The sbatch job: saved on the warning, requeued itself, resumed, finished.
    assert int(info["Restarts"]) >= 1, text(job_out)[-3000:]
    log = log_of(sbatch_dir)
    assert "preemption signal: checkpoint written" in log and "resumed from" in log
    assert_same_weights(
        final_weights(sbatch_dir), final_weights(reference_dir), "sbatch run vs uninterrupted"
    )

    # The sweep: two runs, each requeued by submitit, both read by the report.
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split(",")[0] for p in runs] == ["0_eval.every_epochs=1000", "1_eval.every_epochs=1000"]
    assert ["seed=0" in p.name for p in runs] == [True, False]
    for run in runs:
        assert "resumed from" in log_of(run), f"{run.name} was not interrupted by the time limit"
    assert_same_weights(final_weights(runs[0]), final_weights(reference_dir), "launcher run vs uninterrupted")
    assert launcher_output.count("accounting storage is disabled") <= 1, launcher_output[-3000:]
    assert "reentrant call" not in launcher_output
    done = subprocess.run(
        [sys.executable, "-m", "eomt.report", str(sweep_dir), "--no-plot"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for run in runs:
        assert f"| {run.name} | panoptic |" in done.stdout
    assert all("PQ" in r.metrics for r in report.find_runs(sweep_dir))


# --- 2 + 5: two DDP ranks on one node; a requeue without warning ----------------------------------
def test_sbatch_two_ranks_requeued_without_warning_resume_from_the_periodic_checkpoint(slurm_env, tmp_path):
    env = slurm_env
    run_dir = tmp_path / "run"
    job_id, job_out = sbatch(
        env,
        tmp_path,
        "--nodes=1",
        "--ntasks-per-node=2",
        f"--time={LIMIT_MIN}",
        overrides=[
            "trainer.max_steps=40",
            "trainer.ckpt_every_steps=10",
            "trainer.num_workers=0",
            *NO_EVAL,
            f"hydra.run.dir={run_dir}",
        ],
    )
    checkpoints = run_dir / "checkpoints"
    wait_until(env, "the first periodic checkpoint", lambda: list(checkpoints.glob("step_*.pt")), timeout=300)
    # A node failure: every process dies at once (no signal to save on), then SLURM requeues the job.
    # (SLURM itself never delivers a bare SIGKILL: `scancel --signal=KILL` sends SIGTERM first.)
    assert hard_kill(job_id) == 2
    wait_for_end(env, job_id)
    sh(env, "scontrol", "requeue", job_id)
    info = wait_for_end(env, job_id)
    assert info["JobState"] == "COMPLETED", text(job_out)[-3000:]
    assert info["Restarts"] == "1"
    log = log_of(run_dir)
    assert "rank 1/2 joined via slurm" in text(job_out) + log
    resumed = {int(n) for n in re.findall(r"resumed from \S+ at step (\d+)", log)}  # logged by each rank
    assert len(resumed) == 1 and min(resumed) > 0 and min(resumed) % 10 == 0, log[-3000:]
    assert "preemption signal" not in log
    assert re.search(r"parameters identical on all 2 ranks", log), log[-3000:]
    assert torch.load(sorted(checkpoints.glob("step_*.pt"))[-1], weights_only=True)["step"] == 40


# --- 4: scancel ---------------------------------------------------------------------------------
def test_scancel_saves_at_the_step_boundary_and_stays_cancelled(slurm_env, tmp_path):
    env = slurm_env
    run_dir = tmp_path / "run"
    job_id, job_out = sbatch(
        env,
        tmp_path,
        "--ntasks-per-node=1",
        f"--time={LIMIT_MIN}",
        overrides=[
            "trainer.max_steps=500",
            "trainer.ckpt_every_steps=100000",
            "trainer.num_workers=2",
            *NO_EVAL,
            f"hydra.run.dir={run_dir}",
        ],
    )
    wait_until(env, "the first training step", lambda: stepped(run_dir), timeout=300)
    time.sleep(2)
    # SIGTERM to every process of the step, the DataLoader workers included: they may die first.
    sh(env, "scancel", job_id)
    info = wait_for_end(env, job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    saved = list((run_dir / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1, text(job_out)[-3000:]
    step = torch.load(saved[0], weights_only=True)["step"]
    assert 0 < step < 500
    assert f"checkpoint written at step {step}" in log_of(run_dir)


# --- 6: two nodes, one rank each; a USR2 saves once and requeues once ------------------------------


# Long enough that neither job ends before the slower-starting launcher job is running, on an idle machine.
TWO_NODE_STEPS = 450  # the demo's whole run is 500 steps
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", f"--time={LIMIT_MIN}")  # one rank on each node


def test_two_nodes_one_rank_each_usr2_saves_once_and_requeues_once(slurm_env, tmp_path):
    env = slurm_env
    sbatch_dir = tmp_path / "sbatch_run"
    job_id, job_out = sbatch(
        env,
        tmp_path,
        *TWO_NODES,
        overrides=[
            f"trainer.max_steps={TWO_NODE_STEPS}",
            "trainer.ckpt_every_steps=100000",
            "trainer.num_workers=0",
            *NO_EVAL,
            f"hydra.run.dir={sbatch_dir}",
        ],
    )
    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "-m",
            *DEMO,
            f"trainer.max_steps={TWO_NODE_STEPS}",
            "trainer.ckpt_every_steps=100000",
            "trainer.num_workers=0",
            *NO_EVAL,
            "hydra/launcher=slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.tasks_per_node=1",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=0",
            f"hydra.launcher.timeout_min={LIMIT_MIN}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def loops_running() -> bool:
            return loop_running(sbatch_dir) and any(loop_running(d) for d in sweep_dir.glob("0_*"))

        wait_until(env, "both training loops", loops_running, timeout=300)
        (launcher_run,) = sweep_dir.glob("0_*")
        for job in running_jobs(env):
            assert job_info(env, job)["NodeList"] == "n[1-2]"
            sh(env, "scancel", "--signal=USR2", job)  # to every task of the job's steps
        info = wait_for_end(env, job_id)
        output, _ = launcher.communicate(timeout=400)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text(job_out)[-3000:]
    for run in (sbatch_dir, launcher_run):
        log = log_of(run)
        # Every rank logs its stop and its resume; only rank 0 saves: once on the signal, once at the end.
        assert len(set(re.findall(r"checkpoint written at step (\d+)", log))) == 1, log[-3000:]
        assert len(re.findall(r"\] saved \S+step_\d+\.pt", log)) == 2, log[-3000:]
        assert len(set(re.findall(r"resumed from \S+ at step (\d+)", log))) == 1
        assert "parameters identical on all 2 ranks" in log, log[-3000:]
        assert (
            torch.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)["step"]
            == TWO_NODE_STEPS
        )


# --- issue 19: a sharded (fsdp) run over both nodes, stopped by USR2, requeued, finished ------------------
def test_two_nodes_fsdp_saves_sharded_on_usr2_and_resumes_after_the_requeue(slurm_env, tmp_path):
    env = slurm_env
    run_dir, steps = tmp_path / "run", 40  # about 10 s of steps: the signal lands in the first ones
    job_id, job_out = sbatch(
        env,
        tmp_path,
        *TWO_NODES,
        overrides=[
            "trainer.strategy=fsdp",
            "trainer.compile=false",
            f"trainer.max_steps={steps}",
            "trainer.ckpt_every_steps=100000",
            "trainer.num_workers=0",
            *NO_EVAL,
            f"hydra.run.dir={run_dir}",
        ],
    )
    wait_until(env, "the training loop", lambda: loop_running(run_dir), timeout=300)
    assert job_info(env, job_id)["NodeList"] == "n[1-2]"
    sh(env, "scancel", "--signal=USR2", job_id)
    info = wait_for_end(env, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text(job_out)[-3000:]
    log = log_of(run_dir)
    (stopped,) = set(re.findall(r"checkpoint written at step (\d+)", log))
    assert set(re.findall(r"resumed from \S+step_(\d+) at step \d+", log)) == {stopped.zfill(8)}, log[-3000:]
    saved = re.findall(r"\] saved (\S+)", log)  # the stop and the end, each a sharded directory
    assert saved == [str(run_dir / "checkpoints" / f"step_{int(s):08d}") for s in (stopped, steps)], log[
        -3000:
    ]
    final = Path(saved[-1])
    assert {p.name for p in final.iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "train_state.pt",
    }
    assert torch.load(final / "train_state.pt", weights_only=True)["step"] == steps
