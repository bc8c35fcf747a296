"""Writing back the files a container may hold dirty in the page cache, so that the
rootfs another host gets is the one the frozen container leaves.

With the rootfs transferred: a write through a shared mapping moves the file's mtime and
ctime only in the fault that makes the page writable; later writes to that page go to the
page cache unseen. The frozen pass trusts mtime and ctime (`changes_since`), so such a file
would reach the destination as the first pass saw it, and the restored process would map
an older file. Writing these files back before the first pass's scan makes every page of
their mappings read-only again: the next write faults and moves the ctime, after the
scan's start, which the frozen pass then sees (as a change, or as "racy"). A filesystem
without writeback (tmpfs, ramfs) never moves the ctime for such writes: a known limit.

On shared storage (an NFS export, say) a host's dirty pages reach the server on close,
fsync or writeback, not before; the destination would restore against the older file.
The files the container holds open for writing or maps shared are written back while it
runs (most of the data) and again once it is frozen (what changed since)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from godwit import procfs
from godwit.errors import GodwitError

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def write_back_mapped_files(pids: Iterable[int]) -> int:
    """Write back every regular file the processes map shared; returns how many files."""
    return write_back(procfs.shared_file_mappings(pids).values())


def write_back_written_files(pids: Iterable[int]) -> int:
    """Write back every regular file the processes map shared or hold open for writing;
    returns how many files."""
    pids = list(pids)
    return write_back([*procfs.shared_file_mappings(pids).values(),
                       *procfs.files_open_for_writing(pids)])


def write_back(openers: Iterable[str]) -> int:
    """fdatasync each regular file behind these /proc links (map_files or fd entries), each
    inode once; a link gone meanwhile is skipped (its process unmapped, closed or exited)."""
    done: set[tuple[int, int]] = set()
    for opener in openers:
        try:
            st = os.stat(opener)  # before opening: never open a pipe, socket or device
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in done:
                continue
            fd = os.open(opener, _OPEN_FLAGS)
        except (FileNotFoundError, ProcessLookupError):
            continue
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise GodwitError(f"could not write back {_name(opener)}, which the container "
                              f"holds: {exc.strerror}") from exc
        finally:
            os.close(fd)
        done.add((st.st_dev, st.st_ino))
    return len(done)


def _name(opener: str) -> str:
    """The file's path (in the container's mounts), or the /proc link."""
    try:
        return os.readlink(opener)
    except OSError:
        return opener
