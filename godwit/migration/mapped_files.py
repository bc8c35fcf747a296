"""Files a container maps shared, made safe for the rootfs's passes.

A write through a shared mapping changes the file's mtime and ctime only in the fault that
makes the page writable; later writes to that page go to the page cache unseen until the
page is written back. The rootfs's frozen pass trusts mtime and ctime (`changes_since`), so
such a file would reach the destination as it was in the first pass, and the restored
process would map an older file. Writing these files' dirty pages back before the first
pass's scan makes every page of their mappings read-only again: the next write faults and
moves the ctime, after the scan's start, which the frozen pass then sees (as a change, or
as "racy")."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from godwit import procfs
from godwit.errors import GodwitError


def write_back_mapped_files(pids: Iterable[int]) -> int:
    """Write back the dirty pages of every regular file the processes map shared; returns
    how many files. A mapping gone meanwhile is skipped: a new one faults on its first write."""
    written = 0
    for mapping in procfs.shared_file_mappings(pids).values():
        try:
            fd = os.open(mapping, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            continue
        try:
            written += _write_back(fd, mapping)
        finally:
            os.close(fd)
    return written


def _write_back(fd: int, mapping: str) -> bool:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return False  # a device's memory: not part of a rootfs copy
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise GodwitError(f"could not write back {_name(mapping)}, which the container "
                          f"maps shared: {exc.strerror}") from exc
    return True


def _name(mapping: str) -> str:
    """The mapped file's path (in the container's mounts), or the map_files entry."""
    try:
        return os.readlink(mapping)
    except OSError:
        return mapping
