"""Writes through a shared mapping and the rootfs's passes (`godwit.migration.write_back`).
The container-level test is `test_task_states.py`'s shared-mapping test."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from godwit.migration.write_back import write_back, write_back_mapped_files

# Opening /proc/PID/map_files needs CAP_SYS_ADMIN (as CRIU does); and a disk filesystem,
# for a tmpfs has no writeback.
pytestmark = pytest.mark.integration


def ctime_after(path: Path, write: bytes, mapping: mmap.mmap) -> int:
    time.sleep(0.02)  # past a coarse timestamp tick
    mapping[:len(write)] = write
    return path.stat().st_ctime_ns


def test_after_the_write_back_a_write_through_the_mapping_moves_the_ctime(
        tmp_path: Path) -> None:
    path = tmp_path / "mapped"
    path.write_bytes(bytes(4096))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096, flags=mmap.MAP_SHARED) as m:
        faulted = ctime_after(path, b"1", m)  # the fault that makes the page writable
        assert ctime_after(path, b"2", m) == faulted, "a write to a writable page moved ctime"
        assert write_back_mapped_files([os.getpid()]) >= 1
        assert ctime_after(path, b"3", m) > faulted
        assert path.read_bytes()[:1] == b"3"


def test_files_of_exited_processes_are_skipped() -> None:
    assert write_back_mapped_files([2**22 + 1]) == 0


def test_only_regular_files_are_written_back_each_once(tmp_path: Path) -> None:
    """A pipe's end is never opened (that could block), and two links to one file count once."""
    reader, writer = os.pipe()
    try:
        with open(tmp_path / "file", "wb") as f:
            f.write(b"dirty")
            links = [f"/proc/self/fd/{fd}" for fd in (writer, f.fileno(), f.fileno())]
            assert write_back(links) == 1
    finally:
        os.close(reader)
        os.close(writer)
