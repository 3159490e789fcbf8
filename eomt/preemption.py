"""Stop cleanly on a scheduler's signal, save, and come back: SLURM time limits and preemption.

The signal handlers only record that a signal arrived. The training loop calls `check()` at every
step boundary (all ranks agree, because a signal may reach only some of them): it raises
`TrainingStopped`, as `next_batches()` does when the stop comes first or kills the loader's workers.
The loop catches it once, writes its checkpoint, then calls `finish()`, which asks the scheduler to
requeue the job where that applies.
The requeued job runs the same command in the same run directory and `trainer.resume=auto`
continues from the checkpoint.

Signals:
- SIGUSR1 / SIGUSR2: the time limit is near (`#SBATCH --signal=USR2@300`, submitit's
  `signal_delay_s`) or the cluster announces preemption: save and requeue.
- SIGTERM: `scancel`, or preemption by a cluster that requeues jobs itself: save and stop, never
  requeue (a cancelled job must stay cancelled). Exit code 0.
- SIGINT (Ctrl-C): the first saves at the next step boundary and exits with 130; a second one
  aborts at once (KeyboardInterrupt) without a checkpoint.

SIGTERM and SIGINT usually reach the whole process group, DataLoader workers included. Workers
ignore SIGINT (and SIGUSR1/2) and keep serving; SIGTERM ends them as PyTorch sets it up (ignoring it
would make the shutdown of the loader hang). Once a stop is requested the main process no longer
lets PyTorch turn a worker's death into an exception at an arbitrary point (its SIGCHLD handler), and
`next_batches()` fetches nothing more once a stop is pending and turns "a worker died" (or "the link
to a worker broke", which can come before this process has run its own handler for the signal) into
"stop here", so the checkpoint holds exactly the state of the last finished step.

Requeue paths, chosen in `finish()` on global rank 0:
- inside a submitit job (the Hydra submitit launcher): submitit's own USR2 handler, which this class
  kept when it took the signal over, is called now that the checkpoint exists. It re-submits the
  pickled Hydra job (same overrides, same job number, hence the same run directory) with
  `scontrol requeue` (SLURM) or the local executor's requeue exit code;
- a plain sbatch job that exports EOMT_REQUEUE=1: `scontrol requeue $SLURM_JOB_ID`;
- anything else: nothing; the run can be resumed by running the same command again.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from eomt import distributed

log = logging.getLogger(__name__)

REQUEUE_ENV = "EOMT_REQUEUE"  # set to 1 by slurm/train.sh: requeue plain sbatch jobs via scontrol
SUBMITIT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own setting; USR2 unless changed


class StopReason(enum.IntEnum):
    """Why training stops early. Ranks agree on the largest reason any of them saw."""

    NONE = 0
    INTERRUPT = 1  # SIGINT (Ctrl-C): save and exit with 130
    STOP = 2  # SIGTERM: save and exit
    REQUEUE = 3  # SIGUSR1/SIGUSR2: save, requeue, exit


_REASONS = {
    signal.SIGINT: StopReason.INTERRUPT,
    signal.SIGUSR1: StopReason.REQUEUE,
    signal.SIGUSR2: StopReason.REQUEUE,
    signal.SIGTERM: StopReason.STOP,
}
EXIT_CODES = {StopReason.INTERRUPT: 130, StopReason.STOP: 0, StopReason.REQUEUE: 0}
_WORKER_DIED = "DataLoader worker"  # how PyTorch's errors about dead workers begin
# A worker killed while it hands over a batch: the main process reads a reset or closed connection
# before PyTorch notices the death (its check needs the dead worker reaped).
_WORKER_LINK_ERRORS = (ConnectionError, EOFError)
SIGNAL_GRACE_S = 2.0  # how long a worker's death waits for the stop signal that may have caused it

Handler = Callable[[int, FrameType | None], Any] | int | None


class TrainingStopped(Exception):
    """Every rank agreed to stop (`reason`): the loop saves the last finished step, then `finish()`es."""

    def __init__(self, reason: StopReason):
        super().__init__(f"training stopped ({reason.name.lower()})")
        self.reason = reason


class PreemptionHandler:
    """Turns SIGUSR1/SIGUSR2/SIGTERM/SIGINT into a stop at the next step boundary, then a requeue.

    Use from the training loop (every rank):

        handler = PreemptionHandler()
        handler.install()
        try:
            for step in ...:
                train_step(handler.next_batches(batches, accum))   # raises TrainingStopped
                handler.check()                                    # raises TrainingStopped
        except TrainingStopped:
            handler.finish(save_checkpoint())   # all ranks done saving; one line, then SystemExit(0 or 130)
        finally:
            handler.uninstall()

    Every rank must call `check()` (or `should_stop()`) the same number of times: one collective each.
    """

    def __init__(self) -> None:
        self._received = StopReason.NONE  # written by the signal handler
        self._received_signal: int | None = None
        self._agreed = StopReason.NONE
        self._previous: dict[int, Handler] = {}
        self._interrupted = False
        self._sigchld: Handler = None  # PyTorch's handler, set aside once a stop is requested

    # --- signals ------------------------------------------------------------------------------
    def install(self) -> None:
        """Take over SIGINT, SIGUSR1, SIGUSR2 and SIGTERM, keeping the previous handlers (submitit's)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals are not handled: Python only delivers signals to the main thread")
            return
        for sig in _REASONS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        # SLURM sends SIGCONT with every SIGTERM; inside submitit that handler only logs (see _quiet).
        if signal.SIGCONT not in self._previous:
            previous = signal.getsignal(signal.SIGCONT)
            if _quiet(previous) is not previous:
                self._previous[signal.SIGCONT] = signal.signal(signal.SIGCONT, _quiet(previous))

    def uninstall(self) -> None:
        """Give the signals back to whoever had them before `install()` (submitit's, without its logging)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, _quiet(previous) if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        # After a stop the process is on its way out with dead workers still registered with PyTorch:
        # its handler would raise from whatever cleanup runs next. SIGCHLD stays quiet then.
        if self._sigchld is not None and not self.stop_requested:
            signal.signal(signal.SIGCHLD, self._sigchld)
            self._sigchld = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the loop acts at the next step boundary. No logging here (not signal-safe).
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: abort at once
            self._interrupted = True
        reason = _REASONS.get(signal.Signals(signum), StopReason.STOP)
        if reason > self._received:
            self._received = reason
            self._received_signal = signum
        self._quiet_worker_deaths()

    def _quiet_worker_deaths(self) -> None:
        """The workers may be dying from the same signal: their death must not raise mid-step.

        PyTorch's SIGCHLD handler raises in the main thread wherever it happens to be; the loop's
        `next_batches()` notices dead workers by itself. Python runs pending handlers in signal
        number order, so this runs before a SIGCHLD sent by a worker that died of SIGINT/SIGTERM.
        The replacement is a Python no-op, not SIG_DFL: a SIGCHLD already pending when the handler
        changes would otherwise raise "OSError: Signal 17 ignored due to race condition".
        """
        if self._sigchld is None and hasattr(signal, "SIGCHLD"):
            current = signal.getsignal(signal.SIGCHLD)
            if callable(current):
                self._sigchld = current
                signal.signal(signal.SIGCHLD, _ignore)  # `next_batches()` notices dead workers

    @property
    def stop_requested(self) -> bool:
        """A signal reached this process (the ranks may not agree yet: use `should_stop()` for that)."""
        return bool(self._received)

    def killed_by_stop(self, error: BaseException) -> bool:
        """`error` is a DataLoader's report of workers that the stop signal killed (not a real failure).

        The workers may die before this process has run its own handler for the same signal: a
        worker's death waits up to SIGNAL_GRACE_S for the stop to be recorded.
        """
        if not is_worker_death(error):
            return False
        deadline = time.monotonic() + SIGNAL_GRACE_S
        while not self.stop_requested and time.monotonic() < deadline:
            time.sleep(0.05)  # Python runs pending signal handlers between the sleeps
        return self.stop_requested

    # --- the loop's side ----------------------------------------------------------------------
    def next_batches(self, batches: Iterator, count: int) -> list:
        """The next `count` batches for one step; TrainingStopped on every rank when the step must not run.

        It is raised when a stop is pending on any rank before its batches are fetched, or when the
        loader's workers died because of the stop signal: the caller saves the state it holds (the
        last finished step) and calls `finish()`. A worker death without a stop request is an error.
        With several ranks this takes one collective per call, so all ranks run the step or none.
        """
        taken: list | None = []
        for _ in range(count):
            if self.stop_requested:
                taken = None
                break
            try:
                taken.append(next(batches))
            except (RuntimeError, *_WORKER_LINK_ERRORS) as e:
                if not self.killed_by_stop(e):
                    raise
                taken = None
                break
        if distributed.world_size() > 1:
            failed = float(self._received) if taken is None else 0.0
            agreed = StopReason(int(distributed.all_reduce_max(failed)))
            if agreed:
                self._agree(agreed)
        elif taken is None:
            self._agree(self._received)
        if self._agreed:
            raise TrainingStopped(self._agreed)
        return taken

    @contextmanager
    def stop_if_workers_die(self) -> Iterator[None]:
        """Around other loaders (the evaluation's): their workers killed by the stop signal -> TrainingStopped."""
        try:
            yield
        except (RuntimeError, *_WORKER_LINK_ERRORS) as e:
            if not self.killed_by_stop(e):
                raise
            self.check()  # every rank agrees (this one got the signal) and raises
            raise

    def _agree(self, agreed: StopReason) -> None:
        self._agreed = agreed
        log.warning(
            "stopping at the next checkpoint (%s, %s)",
            self._signal_name(),
            agreed.name.lower(),
        )

    def _signal_name(self) -> str:
        return (
            signal.Signals(self._received_signal).name if self._received_signal else "another rank's signal"
        )

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal; call it at each step boundary on every rank."""
        if self._agreed:
            return True
        agreed = StopReason(int(distributed.all_reduce_max(float(self._received))))
        if agreed:
            self._agree(agreed)
        return bool(agreed)

    def check(self) -> None:
        """`should_stop()` as an exception: TrainingStopped on every rank once any rank got a signal."""
        if self.should_stop():
            raise TrainingStopped(self._agreed)

    def finish(self, checkpoint: str | Path | None = None) -> None:
        """After the checkpoint is written: requeue where that applies (see module doc), then exit.

        Rank 0 prints one line naming the checkpoint; every rank then raises `SystemExit` with 0
        (SIGTERM, SIGUSR1/2) or 130 (Ctrl-C). Inside a submitit job a requeue goes through
        submitit's own handler, which raises `SystemExit` itself, so that no rank leaves a "finished"
        result behind that would tell the launching process the interrupted run is done. Clean up in
        `finally` blocks. Does nothing when no stop was agreed.
        """
        if not self._agreed:
            return
        main = distributed.is_main()
        if main:
            saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
            print(
                f"stopped by {self._signal_name()}: {saved}; run the same command again to resume from it",
                file=sys.stderr,
                flush=True,
            )
        if os.environ.get("SUBMITIT_EXECUTOR"):
            if main and self._agreed == StopReason.REQUEUE:
                log.info("handing over to submitit to requeue the job")
                self._submitit_handler()(_submitit_signal(), None)  # requeues, then raises SystemExit
        elif main and self._agreed == StopReason.REQUEUE and os.environ.get(REQUEUE_ENV) == "1":
            _scontrol_requeue()
        raise SystemExit(EXIT_CODES[self._agreed])

    def _submitit_handler(self) -> Callable[[int, FrameType | None], Any]:
        sig = _submitit_signal()
        handler = self._previous.get(sig)
        if not callable(handler):
            raise RuntimeError(
                f"no submitit handler for {sig.name} was installed before PreemptionHandler.install(); "
                f"check {SUBMITIT_SIGNAL_ENV} or call install() inside the submitit job"
            )
        return handler


def is_worker_death(error: BaseException) -> bool:
    """`error` is how a DataLoader reports a dead worker: PyTorch's own error or a broken link to it."""
    if isinstance(error, _WORKER_LINK_ERRORS):
        return True
    return isinstance(error, RuntimeError) and str(error).startswith(_WORKER_DIED)


def ignore_in_dataloader_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT/SIGUSR1/SIGUSR2, which also reach them.

    With the fork start method workers inherit the training process's handlers (which must not run
    in a worker), with spawn or forkserver (Python 3.14's default) the default action would kill
    them; either way the step that should be saved would fail. SIGTERM stays as PyTorch sets it
    in workers: the loader's shutdown relies on it, and `next_batches()` copes with their death.
    """
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A Python no-op handler (unlike SIG_IGN, a signal already pending when it is set stays harmless)."""


def _quiet(handler: Handler) -> Handler:
    """`handler`, unless it is submitit's `bypass`, which ignores SIGTERM/SIGCONT but logs a line from
    inside the signal handler: a signal landing while the main thread writes a log line then prints a
    "reentrant call inside <_io.BufferedWriter>" traceback. It becomes a silent ignore."""
    is_bypass = getattr(handler, "__name__", "") == "bypass"
    return _ignore if is_bypass and getattr(handler, "__module__", "").startswith("submitit") else handler


def _submitit_signal() -> signal.Signals:
    name = os.environ.get(SUBMITIT_SIGNAL_ENV, "USR2")
    sig = getattr(signal, f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise RuntimeError(f"{SUBMITIT_SIGNAL_ENV}={name} is not a signal name; use e.g. USR2")
    return sig


def _scontrol_requeue() -> None:
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        log.warning(
            "%s=1 but SLURM_JOB_ID is not set: not a SLURM job, nothing to requeue",
            REQUEUE_ENV,
        )
        return
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    except FileNotFoundError as err:
        raise RuntimeError(
            f"{REQUEUE_ENV}=1 but `scontrol` is not on PATH; unset {REQUEUE_ENV} or fix PATH"
        ) from err
    log.info("requeued SLURM job %s; it resumes from the checkpoint just written", job_id)
