"""Durable file writes: the one way godwit replaces a file it must find whole after a crash
(journals, records, keys, certificates)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably: written with exactly `mode`, fsync'd, renamed
    over `path`, and the directory fsync'd, so a crash of the host leaves the old or the new."""
    _replace(path, data, mode, durable=True)
    fsync_dir(path.parent)


def replace_file(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace `path` with `data` by a rename, without fsync: a reader never sees it half
    written, even if the writer is killed, but a crash of the host may lose it. For state
    that dies with the host anyway (pids, progress), and writes inside a freeze."""
    _replace(path, data, mode, durable=False)


def _replace(path: Path, data: bytes | str, mode: int, durable: bool) -> None:
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # writers don't collide
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, payload)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
