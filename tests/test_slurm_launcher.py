"""eomt's SLURM launcher on clusters without accounting: job states from squeue instead of sacct."""

import os

from eomt.slurm_launcher import LEFT_QUEUE, SqueueWatcher, accounting_enabled


def test_squeue_rows_give_job_states_and_jobs_gone_from_the_queue_have_ended(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("eomt.slurm_launcher.time.monotonic", lambda: clock[0])
    watcher = SqueueWatcher(delay_s=60)
    for job_id in ("41", "41_0", "41_1", "42", "43"):
        watcher.register_job(job_id)
    assert watcher._make_command()[0] == "squeue"
    listing = b"41_0|RUNNING|n1\n41_1|PENDING|\n42|COMPLETED|n2\n"
    info = watcher.read_info(listing)
    assert {k: v["State"] for k, v in info.items()} == {
        "41_0": "RUNNING",
        "41_1": "PENDING",
        "42": "COMPLETED",
        "43": "REQUEUED",  # left out of one listing: perhaps a busy controller, or on its way back
        "41": LEFT_QUEUE,  # the array's own id: squeue lists its tasks instead
    }
    clock[0] += 70
    # not listed for longer than SETTLE_S: ended; its result file (or its absence) tells how
    assert watcher.read_info(listing)["43"]["State"] == LEFT_QUEUE
    assert watcher.read_info(listing + b"43|RUNNING|n1\n")["43"]["State"] == "RUNNING"


def test_accounting_is_read_from_scontrol(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    scontrol.write_text("#!/bin/sh\necho 'AccountingStorageType   = accounting_storage/none'\n")
    scontrol.chmod(0o755)
    assert not accounting_enabled()
    scontrol.write_text("#!/bin/sh\necho 'AccountingStorageType   = accounting_storage/slurmdbd'\n")
    assert accounting_enabled()
    scontrol.write_text("#!/bin/sh\nexit 1\n")  # no cluster configured: keep submitit's sacct
    assert accounting_enabled()


def test_a_failed_state_counts_only_once_it_has_held(monkeypatch):
    """A job requeueing itself passes through FAILED/CANCELLED on its way back to PENDING."""
    clock = [100.0]
    monkeypatch.setattr("eomt.slurm_launcher.time.monotonic", lambda: clock[0])
    watcher = SqueueWatcher(delay_s=60)
    watcher.register_job("84")
    states = []
    for seconds, row in [
        (0, "RUNNING"),
        (1, "FAILED"),
        (2, "PENDING"),
        (3, "CANCELLED by 0"),
        (70, "CANCELLED"),
    ]:
        clock[0] = 100.0 + seconds
        info = watcher.read_info(f"84|{row}|n1\n83|FAILED|n2\n".encode())
        states.append(info["84"]["State"])
        assert info["83"]["State"] == "FAILED"  # not one of the launcher's jobs: as squeue says
    assert states == ["RUNNING", "REQUEUED", "PENDING", "REQUEUED", "CANCELLED"]
