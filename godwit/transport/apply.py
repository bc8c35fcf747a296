"""Applying received records to a destination tree, one handler per record kind.

Every path is checked (`check_path`) and resolved below the destination without following
symlinks (`safefs`). Regular files, symlinks and special files are created under a
temporary name and renamed into place only when complete (files: after their digest
matched). Directories are created ``0o700``; their modes and mtimes are applied at the end
(`finish`), when the mtimes of directories the stream modified without sending them are
restored too. Ownership is applied only as root.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import secrets
import stat
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from godwit.transport.rules import FILE_CAPS, KEEP_ALL, TreeRules
from godwit.transport.safefs import (
    GONE,
    DirFds,
    create_temp_file,
    ensure_dir,
    entry_path,
    lstat_at,
    open_root,
    pwrite_all,
    remove_entry,
    replace_entry,
    same_inode,
    set_dir_mode_mtime,
    set_mode_mtime,
    set_xattrs,
)
from godwit.transport.wire import (
    DEVICE_TYPES,
    SHA256,
    Hasher,
    TransferError,
    TransferStats,
    carried_xattr,
    check_path,
    header_extents,
    header_int,
    header_mode,
    header_mtime,
    header_owner,
    header_symlink_target,
    header_xattrs,
    new_hasher,
)

_ASYNC_WRITE_MIN = 128 << 10  # data pieces this big are written by a writer thread
_WRITES_INFLIGHT = 8
_NODE_TYPES = {"fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK,
               "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}
_RDEV_MAX = 2**64 - 1


def _replaceable_xattr(name: str) -> bool:
    return carried_xattr(name) and (not name.startswith("security.") or name == FILE_CAPS)


@dataclass
class IncomingFile:
    """A regular file being received into its temporary name."""

    path: str
    head: str  # parent directory
    name: str
    tmp: str
    fd: int
    header: dict
    size: int
    remaining: int  # data bytes still to come
    extents: list[tuple[int, int]] | None
    hasher: Hasher
    xattrs: dict[str, bytes] = field(default_factory=dict)
    offset: int = 0  # dense files: next write offset
    ext_i: int = 0
    ext_pos: int = 0
    writes: deque = field(default_factory=deque)  # pending writer-thread futures

    def extent_pieces(self, data: memoryview) -> Iterator[tuple[memoryview, int]]:
        """(piece, file offset) for the next `data` bytes of a sparse file's stream."""
        while data:
            off, length = self.extents[self.ext_i]
            k = min(length - self.ext_pos, len(data))
            yield data[:k], off + self.ext_pos
            data = data[k:]
            self.ext_pos += k
            if self.ext_pos == length:
                self.ext_i += 1
                self.ext_pos = 0

    def wait_writes(self) -> None:
        while self.writes:
            self.writes.popleft().result()


RecordHandler = Callable[[str, dict], IncomingFile | None]


class TreeWriter:
    """The destination side of a stream: `apply` each record, `write` a file's data,
    `commit_file` it with its digest, then `finish`. Blocking file I/O."""

    def __init__(self, dest: Path | str, stats: TransferStats,
                 rules: TreeRules = KEEP_ALL):
        os.makedirs(dest, exist_ok=True)
        self.rules = rules
        self.root_fd = open_root(dest)
        self.stats = stats
        self.incoming: IncomingFile | None = None
        self.where = ""  # the path being worked on, for error messages
        self.digest = SHA256  # the files' digest algorithm: the stream's header tells
        self._dirs = DirFds(self.root_fd)
        self._dir_meta: dict[str, tuple[int, int]] = {}  # rel -> (mode, mtime_ns), deferred
        self._touched: dict[str, tuple[int, int]] = {}  # rel -> original (atime, mtime)
        self._tmp_prefix = f".godwit-tmp.{secrets.token_hex(4)}."
        self._tmp_n = 0
        self._chown = os.geteuid() == 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._handlers: dict[str, RecordHandler] = {
            "file": self._begin_file,
            "dir": self._mkdir,
            "symlink": self._symlink,
            "fifo": self._mknod,
            "sock": self._mknod,
            "chr": self._mknod,
            "blk": self._mknod,
            "hardlink": self._hardlink,
            "delete": self._delete,
        }

    def apply(self, h: dict) -> IncomingFile | None:
        """Apply one record (not ``end``); a ``file`` returns the file whose data follows."""
        kind = h.get("type")
        self.where = str(h.get("path"))[:200]
        rel = check_path(h.get("path"), allow_root=kind == "dir")
        self.stats.entries += 1
        if kind not in ("file", "delete"):  # a file is charged its data too, in _begin_file
            self.rules.charge(0, rel)
        self._touched.pop(rel, None)  # its own times come from this record, if any
        handler = self._handlers.get(kind)  # type: ignore[arg-type]
        if handler is None:
            raise TransferError(f"malformed header: unknown type {str(kind)[:40]!r}")
        return handler(rel, h)

    def finish(self) -> None:
        """Deepest first: modes and mtimes of received directories, then restore the
        mtimes of the other directories we modified."""
        for rel in sorted(self._dir_meta, reverse=True):
            self._apply_dir_meta(rel, *self._dir_meta[rel])
        for rel in sorted(self._touched, reverse=True):
            if rel not in self._dir_meta:
                self._restore_dir_times(rel, self._touched[rel])

    def abort(self) -> None:
        """Drop the file being received (its temporary name) and close everything."""
        cur, self.incoming = self.incoming, None
        if cur is not None:
            for f in cur.writes:
                with contextlib.suppress(OSError):
                    f.result()
            with contextlib.suppress(OSError):
                os.close(cur.fd)
            with contextlib.suppress(OSError):
                os.unlink(cur.tmp, dir_fd=self._dirs.open(cur.head))
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=False)
            self._writer = None
        if self.root_fd < 0:
            return
        self._dirs.close()
        os.close(self.root_fd)
        self.root_fd = -1

    # ---- regular files

    def write(self, data: memoryview) -> None:
        """Big pieces go to the writer thread (hashing here runs meanwhile), small ones
        are written inline; offsets are explicit so the order does not matter."""
        cur = self.incoming
        cur.remaining -= len(data)
        if cur.extents is None:
            self.stats.bytes += len(data)
            self._pwrite(cur, data, cur.offset)
            cur.offset += len(data)
        else:
            for piece, offset in cur.extent_pieces(data):
                self._pwrite(cur, piece, offset)
        cur.hasher.update(data)

    def commit_file(self, digest: bytes) -> None:
        """Check the digest, apply the metadata and rename the file into place."""
        cur = self.incoming
        cur.wait_writes()
        if digest != cur.hasher.digest():
            raise TransferError(f"{cur.path[:200]}: {self.digest} mismatch")
        h = cur.header
        if self._chown:
            os.fchown(cur.fd, *header_owner(h))  # before the xattrs: chown drops file caps
        set_mode_mtime(cur.fd, self.rules.mode(h["mode"]), h["mtime_ns"])
        self._set_xattrs(cur.fd, cur.xattrs, cur.path)
        os.close(cur.fd)
        self.incoming = None
        if cur.extents is not None:
            self.stats.bytes += cur.size
        self.stats.files += 1
        fd_dir = self._dirs.open(cur.head)
        try:
            replace_entry(fd_dir, cur.tmp, cur.name)
        except OSError as e:
            raise TransferError(f"{cur.path[:200]}: {e.strerror or e}") from e

    def _begin_file(self, rel: str, h: dict) -> IncomingFile:
        size = header_int(h, "size", 0, 2**62)
        header_mode(h)
        header_mtime(h)
        header_owner(h)
        xattrs = self.rules.xattrs(header_xattrs(h, rel))
        extents = h.get("extents")
        if extents is not None:
            extents = header_extents(extents, size)
        data_len = size if extents is None else sum(ln for _, ln in extents)
        self.rules.charge(data_len, rel)
        fd_dir, name = self._parent(rel)
        tmp = self._tmp()
        fd = create_temp_file(fd_dir, tmp)
        head = rel.rpartition("/")[0]
        self.incoming = IncomingFile(rel, head, name, tmp, fd, h, size, data_len, extents,
                                     new_hasher(self.digest), xattrs)
        if extents is not None:
            os.ftruncate(fd, size)
        return self.incoming

    def _pwrite(self, cur: IncomingFile, data: memoryview, offset: int) -> None:
        if len(data) < _ASYNC_WRITE_MIN:
            pwrite_all(cur.fd, data, offset)
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "godwit-write")
        cur.writes.append(self._writer.submit(pwrite_all, cur.fd, data, offset))
        while len(cur.writes) > _WRITES_INFLIGHT:
            cur.writes.popleft().result()

    # ---- other records

    def _mkdir(self, rel: str, h: dict) -> None:
        mode = header_mode(h)
        mtime = header_mtime(h)
        uid, gid = header_owner(h)
        xattrs = self.rules.xattrs(header_xattrs(h, rel))
        if rel:
            fd, name = self._parent(rel)
            ensure_dir(fd, name)
            if self._chown:
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
            self._set_xattrs(entry_path(fd, name), xattrs, rel)
        else:
            if self._chown:
                os.fchown(self.root_fd, uid, gid)
            self._set_xattrs(self.root_fd, xattrs, rel)
        self._dir_meta[rel] = (mode, mtime)

    def _symlink(self, rel: str, h: dict) -> None:
        target = header_symlink_target(h, rel)
        mtime = header_mtime(h)
        owner = header_owner(h)
        xattrs = self.rules.xattrs(header_xattrs(h, rel))
        fd, name = self._parent(rel)
        self._install(fd, name, lambda tmp: os.symlink(target, tmp, dir_fd=fd),
                      owner=owner, mode=None, mtime=mtime, xattrs=xattrs)

    def _mknod(self, rel: str, h: dict) -> None:
        kind = h["type"]
        mode = self.rules.mode(header_mode(h))
        mtime = header_mtime(h)
        if kind in DEVICE_TYPES:
            rdev = header_int(h, "rdev", 0, _RDEV_MAX)
            self.rules.check_device(kind, rdev, rel)
        else:
            rdev = 0
        owner = header_owner(h)
        xattrs = self.rules.xattrs(header_xattrs(h, rel))
        fd, name = self._parent(rel)
        file_type = _NODE_TYPES[kind]
        self._install(fd, name, lambda tmp: os.mknod(tmp, mode | file_type, rdev, dir_fd=fd),
                      owner=owner, mode=mode, mtime=mtime, xattrs=xattrs)

    def _install(self, fd: int, name: str, create: Callable[[str], None], *,
                 owner: tuple[int, int], mode: int | None, mtime: int,
                 xattrs: dict[str, bytes]) -> None:
        """Create a node under a temporary name, give it its metadata, rename it into place."""
        tmp = self._tmp()
        create(tmp)
        try:
            if self._chown:
                os.chown(tmp, *owner, dir_fd=fd, follow_symlinks=False)
            if mode is not None:  # mknod applies the umask; tmp is our new node
                os.chmod(tmp, mode, dir_fd=fd)
            self._set_xattrs(entry_path(fd, tmp), xattrs, self.where)
            os.utime(tmp, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)
        except BaseException:
            os.unlink(tmp, dir_fd=fd)
            raise
        replace_entry(fd, tmp, name)

    @staticmethod
    def _set_xattrs(target: int | str, xattrs: dict[str, bytes], rel: str) -> None:
        """The entry's extended attributes become exactly the record's (those a new entry
        inherited, a default ACL's, or an updated one had, go), but for other security.*
        ones, which this host's own security module may have set."""
        try:
            set_xattrs(target, xattrs, stale=_replaceable_xattr)
        except OSError as e:
            raise TransferError(f"{rel[:200]}: extended attributes: {e.strerror or e}") from e

    def _hardlink(self, rel: str, h: dict) -> None:
        try:
            target = check_path(h.get("target"))
        except ValueError as e:
            raise TransferError(f"rejected hardlink target: {e}") from e
        missing = f"{rel[:200]}: hardlink target {target[:200]!r} missing"
        thead, _, tname = target.rpartition("/")
        try:
            tfd = self._dirs.open_private(thead)
        except OSError as e:
            raise TransferError(missing) from e
        try:
            st = lstat_at(tfd, tname)
            if st is None or not stat.S_ISREG(st.st_mode):
                raise TransferError(missing)
            fd, name = self._parent(rel)
            if same_inode(lstat_at(fd, name), st):
                return  # already this link (rename() would leave tmp behind)
            tmp = self._tmp()
            os.link(tname, tmp, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
            replace_entry(fd, tmp, name)
        finally:
            if tfd != self.root_fd:
                os.close(tfd)

    def _delete(self, rel: str, h: dict) -> None:
        if not rel:
            raise TransferError("rejected path: cannot delete the tree root")
        try:
            self._dirs.open(rel.rpartition("/")[0])
        except FileNotFoundError:
            return  # already gone with its parent
        except OSError:
            pass  # _parent() explains
        fd, name = self._parent(rel)
        remove_entry(fd, name)

    # ---- helpers

    def _parent(self, rel: str) -> tuple[int, str]:
        """(fd of the parent directory, name) for modifying `rel`; records the parent's
        original times so that they can be restored."""
        head, _, name = rel.rpartition("/")
        try:
            fd = self._dirs.open(head)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise TransferError(f"{rel[:200]}: parent is not a directory (symlink?)") from e
            if e.errno == errno.ENOENT:
                raise TransferError(f"{rel[:200]}: parent directory missing") from e
            raise
        if head not in self._touched:
            st = os.stat(fd)
            self._touched[head] = (st.st_atime_ns, st.st_mtime_ns)
        return fd, name

    def _tmp(self) -> str:
        self._tmp_n += 1
        return f"{self._tmp_prefix}{self._tmp_n}"

    def _apply_dir_meta(self, rel: str, mode: int, mtime: int) -> None:
        self.where = rel or "."
        if rel:
            head, _, name = rel.rpartition("/")
            set_dir_mode_mtime(self._dirs.open(head), name, mode, mtime)
        else:
            set_mode_mtime(self.root_fd, mode, mtime)

    def _restore_dir_times(self, rel: str, times: tuple[int, int]) -> None:
        self.where = rel or "."
        if not rel:
            os.utime(self.root_fd, ns=times)
            return
        head, _, name = rel.rpartition("/")
        try:  # it may have been deleted or replaced later in the stream
            fd = self._dirs.open(head)
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)
        except OSError as e:
            if e.errno not in GONE:
                raise
