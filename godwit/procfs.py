"""Facts about host processes, this process's mounts and the host's memory, read from /proc."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3… of /proc/PID/stat (after the command name), or None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def command_name(pid: int) -> str | None:
    """/proc/PID/comm, or None if no such process."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def parent(pid: int) -> int | None:
    """The parent's pid, or None if no such process."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def children(pid: int) -> list[int]:
    """The pids of a process's children: each of its threads lists those it forked
    (`/proc/PID/task/TID/children`, which CRIU needs too)."""
    found: list[int] = []
    with contextlib.suppress(OSError):  # the process ended
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # the thread ended
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """The pids of every descendant of a process (children, theirs, …). Read from the
    tree down, not by scanning every process of the host: a fault point polls it while a
    CRIU runs for a few milliseconds only."""
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def start_time(pid: int) -> str | None:
    """When the process started, in clock ticks since boot (tells a reused pid apart)."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def file_locks(pids: set[int]) -> int:
    """How many file locks (flock, POSIX, OFD) the processes ``pids`` hold (/proc/locks)."""
    held = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter blocked on the lock above it
            continue
        owner = next((f for f in fields[4:6] if f.lstrip("-").isdigit()), None)
        held += owner is not None and int(owner) in pids
    return held


def mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, filesystem type, options) of every mount this process sees, in mount
    order."""
    return [(fields[1], fields[2], fields[3].split(","))
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if len(fields := line.split()) >= 4]


def fs_type(path: Path) -> str:
    """Type of the filesystem mounted deepest above `path` (the last such mount wins)."""
    best, kind = "", ""
    for mount_point, mount_type, _options in mounts():
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, mount_type
    return kind


def has_shared_memory(pids: Iterable[int]) -> bool:
    """Does any of these processes map shared memory that is not a file on disk (System V
    shm, shared anonymous memory, memfd)? CRIU dumps it apart from the tasks' pages."""
    return any(_shared_memory(line) for _, line in _maps_lines(pids))


def _maps_lines(pids: Iterable[int]) -> Iterator[tuple[int, str]]:
    """(pid, line) of each process's /proc/PID/maps; a process gone maps nothing."""
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            yield pid, line


def _shared_memory(maps_line: str) -> bool:
    fields = maps_line.split(maxsplit=5)
    if len(fields) < 5 or fields[1][3:4] != "s":
        return False
    path = fields[5] if len(fields) == 6 else ""
    return (not path or path.startswith(("/SYSV", "/dev/zero", "/memfd:", "[anon_shmem"))
            or path.endswith("(deleted)"))


def shared_file_mappings(pids: Iterable[int]) -> dict[tuple[int, int], str]:
    """Files the processes map shared, each once: (st_dev, st_ino) -> the
    /proc/PID/map_files entry of one of its mappings, which opens that very file. Shared
    memory and deleted files (see `_shared_memory`), which CRIU dumps itself, are left out."""
    files: dict[tuple[int, int], str] = {}
    for pid, line in _maps_lines(pids):
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1][3:4] != "s" or _shared_memory(line):
            continue
        major, minor = (int(part, 16) for part in fields[3].split(":"))
        inode = (os.makedev(major, minor), int(fields[4]))
        files.setdefault(inode, f"/proc/{pid}/map_files/{fields[0]}")
    return files


def files_open_for_writing(pids: Iterable[int]) -> list[str]:
    """The /proc/PID/fd entries the processes hold open for writing (of any kind)."""
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue  # gone: it holds nothing any more
        found += [f"/proc/{pid}/fd/{fd}" for fd in fds if _open_for_writing(pid, fd)]
    return found


def _open_for_writing(pid: int, fd: str) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
    except (OSError, StopIteration):
        return False  # closed meanwhile
    return flags & os.O_ACCMODE != os.O_RDONLY


_SO_ACCEPTCON = 0x10000  # /proc/net/unix flags: a listening socket


def unix_listening(pid: int, name: str) -> bool:
    """Process `pid` has a unix socket bound to `name` (as it passed it to bind) listening."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    try:
        table = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in table:  # Num RefCount Protocol Flags Type St Inode Path
        fields = line.split()
        if len(fields) == 8 and fields[7] == name and fields[6] in inodes:
            return int(fields[3], 16) & _SO_ACCEPTCON != 0
    return False


def mem_available() -> int:
    """Bytes the kernel estimates can be allocated without swapping (/proc/meminfo's
    MemAvailable), 0 if it does not say."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
