"""Speeds say whether they were measured alone: the share of our CPUs that other processes used."""

import os
import subprocess
import sys
import time

import pytest

from eomt import profiling


def fake_proc(root, cpu_ticks: dict[int, tuple[int, int]], processes: dict[int, tuple[int, int]]) -> None:
    """/proc/stat with per-CPU (busy, idle) ticks and /proc/<pid>/stat with (ppid, utime) per process."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0" for n, (busy, idle) in cpu_ticks.items()]
    (root / "stat").write_text("\n".join(lines) + "\n")
    for pid, (ppid, utime) in processes.items():
        (root / str(pid)).mkdir(exist_ok=True)
        fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), "0"] + ["0"] * 30
        (root / str(pid) / "stat").write_text(f"{pid} (a name) with) {' '.join(fields)}\n")


@pytest.fixture
def proc(tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "PROC", tmp_path)
    monkeypatch.setattr(profiling, "_ticks_per_s", lambda: 100.0)
    return tmp_path


def test_other_load_counts_other_processes_not_ours_nor_our_workers(proc, monkeypatch):
    me = os.getpid()
    clock = iter([0.0, 0.0, 1.0])  # LoadMeter(), start(), conditions()
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    fake_proc(proc, {0: (0, 0), 1: (0, 0), 2: (0, 0)}, {me: (1, 0), 90001: (me, 0), 90002: (1, 0)})
    meter = profiling.LoadMeter()
    meter.cpus = {0, 1}
    meter.start()
    # one second on CPUs 0 and 1 (CPU 2 is not ours): 200 ticks busy; we used 80, our worker 40,
    # another process 80: others kept 80 of 200 ticks busy, none idle
    fake_proc(proc, {0: (100, 0), 1: (100, 0), 2: (100, 0)}, {me: (1, 80), 90001: (me, 40), 90002: (1, 80)})
    got = meter.conditions()
    assert got["other_load"] == pytest.approx(0.4) and got["idle"] == pytest.approx(0.0)
    assert got["under_load"] is True


def test_others_on_cpus_left_idle_do_not_mark_the_speed(proc, monkeypatch):
    """Another job's workers on a many-core GPU node: busy, but CPUs stayed free for our threads."""
    me = os.getpid()
    clock = iter([0.0, 0.0, 1.0])
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    fake_proc(proc, {n: (0, 0) for n in range(4)}, {me: (1, 0), 90002: (1, 0)})
    meter = profiling.LoadMeter()
    meter.cpus = {0, 1, 2, 3}
    meter.start()
    fake_proc(proc, {0: (100, 0), 1: (100, 0), 2: (20, 80), 3: (0, 100)}, {me: (1, 100), 90002: (1, 120)})
    got = meter.conditions()
    assert got["other_load"] == pytest.approx(0.3) and got["idle"] == pytest.approx(0.45)
    assert got["under_load"] is False


def test_without_proc_the_load_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "PROC", tmp_path / "absent")
    assert profiling.LoadMeter().conditions() == {"other_load": None, "idle": None, "under_load": False}


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc")
def test_a_busy_foreign_process_is_seen(tmp_path):
    """A CPU-bound process outside our tree (started by a shell that exits) keeps at least one CPU's
    worth of our CPUs busy while we sleep: the CPUs never idle while it can run."""
    script = "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"
    (tmp_path / "burn.py").write_text(script)
    subprocess.run(["sh", "-c", f"{sys.executable} {tmp_path / 'burn.py'} &"], check=True)  # reparented
    time.sleep(0.3)
    meter = profiling.LoadMeter()
    time.sleep(1.0)
    load = meter.conditions()["other_load"]
    assert load is not None and 0.8 / len(meter.cpus) <= load <= 1.0
