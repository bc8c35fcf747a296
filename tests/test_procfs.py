"""What godwit reads about host processes from /proc."""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


TREE = """
import subprocess, sys, threading, time
def spawn():  # from a thread that stays: its children are listed under that thread
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE)
    print(shell.pid, shell.stdout.readline().decode().strip(), flush=True)
    time.sleep(30)
threading.Thread(target=spawn, daemon=True).start()
print(subprocess.Popen(["sleep", "30"]).pid, flush=True)
time.sleep(30)
"""


def test_descendants_are_found_through_every_thread() -> None:
    tree = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    spawned: set[int] = set()
    try:
        spawned = {int(pid) for _ in range(2) for pid in tree.stdout.readline().split()}
        assert len(spawned) == 3  # a sleep, and a shell with its sleep
        assert set(procfs.descendants(tree.pid)) == spawned
        assert procfs.descendants(1 << 30) == []  # no such process
    finally:
        for pid in [tree.pid, *spawned]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        tree.wait()


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


@pytest.mark.parametrize(("line", "shared"), [
    ("7f00-7f10 rw-s 00000000 00:01 42 /SYSV00000000 (deleted)", True),
    ("7f00-7f10 rw-s 00000000 00:01 7 /dev/zero (deleted)", True),
    ("7f00-7f10 rw-s 00000000 00:01 9 /memfd:pool (deleted)", True),
    ("7f00-7f10 rw-s 00000000 fd:01 1234 /var/lib/postgresql/data/file", False),
    ("7f00-7f10 rw-p 00000000 00:00 0 ", False),
    ("7f00-7f10 r--s 00000000 fd:01 99 /usr/lib/locale/locale-archive", False)])
def test_shared_memory_mappings_are_told_from_shared_files(line: str, shared: bool) -> None:
    assert procfs._shared_memory(line) is shared


def test_this_process_maps_shared_memory_once_it_does() -> None:
    with mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED):
        assert procfs.has_shared_memory([os.getpid()])
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        assert not procfs.has_shared_memory([child.pid])  # a plain process maps none
    finally:
        child.kill()
        child.wait()


MAPS = """
import mmap, sys, time
shared, private = open(sys.argv[1], "r+b"), open(sys.argv[2], "r+b")
maps = [mmap.mmap(shared.fileno(), 4096, flags=mmap.MAP_SHARED),
        mmap.mmap(shared.fileno(), 4096, flags=mmap.MAP_SHARED, offset=4096),
        mmap.mmap(private.fileno(), 4096, flags=mmap.MAP_PRIVATE),
        mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)]  # shared memory: CRIU dumps it
print("mapped", flush=True)
time.sleep(30)
"""


def test_shared_file_mappings_name_each_file_mapped_shared_once(tmp_path: Path) -> None:
    shared, private = tmp_path / "shared", tmp_path / "private"
    for path in (shared, private):
        path.write_bytes(bytes(8192))
    child = subprocess.Popen([sys.executable, "-c", MAPS, str(shared), str(private)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "mapped\n"
        files = procfs.shared_file_mappings([child.pid, 2**22 + 1])  # the second: no such pid
    finally:
        child.kill()
        child.wait()
    inode, private_inode = ((p.stat().st_dev, p.stat().st_ino) for p in (shared, private))
    assert inode in files and private_inode not in files  # (glibc maps a cache file shared)
    assert files[inode].startswith(f"/proc/{child.pid}/map_files/")
    assert not any(os.major(dev) == 0 and os.minor(dev) == 1 for dev, _ in files)  # shmem


def test_files_open_for_writing_are_told_from_those_open_for_reading(tmp_path: Path) -> None:
    written, read = tmp_path / "written", tmp_path / "read"
    read.write_bytes(b"")
    with open(written, "wb") as w, open(read, "rb") as r:
        found = procfs.files_open_for_writing([os.getpid(), 2**22 + 1])
        assert f"/proc/{os.getpid()}/fd/{w.fileno()}" in found
        assert f"/proc/{os.getpid()}/fd/{r.fileno()}" not in found


def test_a_unix_socket_listens_only_after_listen(tmp_path: Path, monkeypatch) -> None:
    """CRIU's lazy-pages daemon binds its socket (the file appears) before it listens."""
    monkeypatch.chdir(tmp_path)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("lazy.socket")  # relative, as CRIU binds it
        assert (tmp_path / "lazy.socket").exists()
        assert not procfs.unix_listening(os.getpid(), "lazy.socket")
        server.listen(1)
        assert procfs.unix_listening(os.getpid(), "lazy.socket")
        assert not procfs.unix_listening(os.getpid(), "other.socket")
