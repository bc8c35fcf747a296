"""What godwit reads about host processes from /proc."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from godwit import procfs


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while procfs.stat_fields(child.pid)[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert procfs.alive(os.getpid())
    assert not procfs.alive(child.pid)  # exited, not yet reaped
    child.wait()
    assert not procfs.alive(child.pid) and procfs.start_time(child.pid) is None


def test_start_time_tells_processes_apart() -> None:
    first = subprocess.Popen(["sleep", "5"])
    time.sleep(0.05)
    second = subprocess.Popen(["sleep", "5"])
    try:
        assert procfs.start_time(first.pid) != procfs.start_time(second.pid)
        assert procfs.start_time(os.getpid()) == procfs.start_time(os.getpid())
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_fs_type_is_the_deepest_mount_above_a_path() -> None:
    assert procfs.fs_type(Path("/proc/self/status")) == "proc"
    assert procfs.fs_type(Path("/proc")) == "proc"
    assert procfs.fs_type(Path("/dev/shm/anything")) == "tmpfs"
    assert any(mount[:2] == ("/proc", "proc") for mount in procfs.mounts())
