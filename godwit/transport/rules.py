"""What a received tree may hold: how many bytes, set-id bits and file capabilities,
device nodes.

The defaults keep everything (a faithful copy); a destination agent receiving a peer's
tree passes stricter rules (see `godwit.migration.receiver`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from godwit.transport.wire import TransferError

ENTRY_COST = 256  # bytes charged per record: bounds inodes, not only data
SETID_BITS = 0o6000
FILE_CAPS = "security.capability"  # the extended attribute of a file's capabilities


class UploadTooLarge(TransferError):
    """A tree brought its uploads past their byte budget."""


class ByteBudget:
    """Bytes the uploads of one migration may still write (shared by its uploads, each
    received in its own thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, where: str) -> None:
        with self._lock:
            if self.used + nbytes > self.limit:
                raise UploadTooLarge(
                    f"upload larger than announced: {where[:200]!r} would bring it past "
                    f"{self.limit} bytes")
            self.used += nbytes


@dataclass(frozen=True)
class TreeRules:
    """`budget`: bytes of data (plus ENTRY_COST a record) the tree may write, None for no
    bound; `keep_setid`: keep setuid/setgid bits of files and nodes; `device_allowed(kind,
    major, minor)` says which ``chr``/``blk`` nodes may be made, None for all."""

    budget: ByteBudget | None = None
    keep_setid: bool = True
    device_allowed: Callable[[str, int, int], bool] | None = None

    def charge(self, nbytes: int, where: str) -> None:
        if self.budget is not None:
            self.budget.take(nbytes + ENTRY_COST, where)

    def mode(self, mode: int) -> int:
        """A file's or node's mode as it may be applied here."""
        return mode if self.keep_setid else mode & ~SETID_BITS

    def xattrs(self, xattrs: dict[str, bytes]) -> dict[str, bytes]:
        """A file's extended attributes as they may be applied here: its capabilities go
        with the set-id bits."""
        if self.keep_setid or FILE_CAPS not in xattrs:
            return xattrs
        return {name: value for name, value in xattrs.items() if name != FILE_CAPS}

    def check_device(self, kind: str, rdev: int, where: str) -> None:
        if self.device_allowed is None:
            return
        major, minor = os.major(rdev), os.minor(rdev)
        if not self.device_allowed(kind, major, minor):
            raise TransferError(f"{where[:200]}: device node {kind} {major}:{minor} refused "
                                "(not allowed by this host's admission policy)")



KEEP_ALL = TreeRules()  # a faithful copy
