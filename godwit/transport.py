"""Streaming a file tree between agents (CRIU image directories, container root filesystems).

The sender turns a `TreePlan` into an async iterable of bytes (the body of an HTTP PUT);
the receiver parses that stream into a destination directory, verifying everything.

Wire format, version 1
======================

A stream starts with an 8-byte magic header, never compressed::

    b"GWTREE" | version: u8 (=1) | flags: u8      (bit 0: the rest is one zstd stream)

The rest of the stream (zstd-compressed when bit 0 is set) is a sequence of records::

    record  := header_len: u32 big-endian | header: UTF-8 JSON object (1 .. 1 MiB)
    file    := record | data bytes | sha256 of the data bytes (32 raw bytes, the trailer)

Header fields by ``type`` (paths and symlink targets are ``os.fsdecode`` strings, so
non-UTF-8 names survive as JSON ``\\udcXX`` escapes):

===========  ===============================================================================
type         fields
===========  ===============================================================================
``dir``      path, mode, uid, gid, mtime_ns          (``path == "."`` is the tree root)
``file``     path, mode, uid, gid, mtime_ns, size, optional ``extents`` ``[[offset, len], ...]``
             (sparse file: only those byte ranges are sent, the rest are holes)
``symlink``  path, uid, gid, mtime_ns, target
``fifo``     path, mode, uid, gid, mtime_ns
``chr/blk``  path, mode, uid, gid, mtime_ns, rdev
``hardlink`` path, target (a path of this tree: a regular file already sent or present)
``delete``   path (removed recursively if present; sent before everything else)
``end``      entries (records before it), files (``file`` records), bytes (sum of ``size``)
===========  ===============================================================================

``mode`` holds the permission bits only (``& 0o7777``); the file type comes from ``type``.
The data of a ``file`` is ``size`` bytes, or the sum of the extent lengths for a sparse
file. Nothing may follow the ``end`` record.

Receiver guarantees: every path is relative, made of normal components (no ``..``, ``.``,
empty component or NUL) and is resolved one component at a time without following
symlinks, so a stream cannot write outside the destination. Regular files, symlinks and
special files are created under a temporary name and renamed into place only when
complete (files: after the sha256 matched), so an aborted transfer leaves no partial file
under its real name; it may leave earlier complete entries. Directory modes and mtimes are
applied at the end (directories are created ``0o700``), and the mtimes of directories the
stream modified without sending them are restored. Ownership is applied only as root.
Any malformed or inconsistent input raises `TransferError`.

Incremental sync: `scan_tree` takes a `Manifest`, `diff_manifests` compares two of them
and `plan_tree(root, changed, deleted)` sends only what changed plus ``delete`` records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

__all__ = [
    "FileMeta",
    "Manifest",
    "TransferError",
    "TransferStats",
    "TreePlan",
    "TreeReceiver",
    "TreeStream",
    "diff_manifests",
    "plan_tree",
    "receive_tree",
    "scan_tree",
    "send_tree",
]

MAGIC = b"GWTREE"
VERSION = 1
FLAG_ZSTD = 0x01
DEFAULT_CHUNK = 1 << 20
MAX_HEADER = 1 << 20
MAX_EXTENTS = 4096  # a file with more data extents is sent dense
DIGEST_LEN = 32
# A manifest entry changed less than this before its scan may change again within the
# same timestamp tick without a visible difference: it is always treated as changed.
RACY_NS = 100_000_000

_WIRE_FLUSH = 256 << 10  # batch small records into wire chunks of about this size
_QUEUE_DEPTH = 4  # wire chunks the sender thread may run ahead
_RECV_BATCH = 1 << 20  # receiver: bytes handed to the worker thread at a time
_RECV_INFLIGHT = 3  # receiver: batches queued for the worker thread
_ASYNC_WRITE_MIN = 128 << 10  # receiver: data pieces this big are written by a writer thread
_WRITES_INFLIGHT = 8

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
}
_NODE_TYPES = {"fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class TransferError(Exception):
    """The tree stream is malformed, corrupted, truncated, or could not be applied."""

    def __init__(self, message: str):
        super().__init__(str(message).translate(_CONTROL))  # one line, even for odd names


_CONTROL = {c: "?" for c in [*range(32), 127]}


@dataclass(frozen=True, slots=True)
class FileMeta:
    """lstat() of one tree entry. `nlink` is informational (ctime covers link changes)."""

    type: str  # file | dir | symlink | fifo | chr | blk
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int  # permission bits only
    uid: int
    gid: int
    target: str | None = None  # symlink target
    rdev: int = 0
    inode: tuple[int, int] = (0, 0)  # (st_dev, st_ino)
    nlink: int = field(default=1, compare=False)


class Manifest(dict[str, FileMeta]):
    """path ("." for the root) -> FileMeta, plus the wall-clock time the scan started."""

    def __init__(self, entries: Iterable[tuple[str, FileMeta]] = (), scanned_ns: int = 0):
        super().__init__(entries)
        self.scanned_ns = scanned_ns


@dataclass
class TreePlan:
    """What `send_tree` will send: entries in order (parents first) and paths to delete."""

    root: Path
    entries: list[tuple[str, FileMeta]]
    deleted: list[str]
    total_bytes: int  # file content bytes, each inode once (progress total)
    manifest: Manifest | None = None  # the scan behind a full plan: "old" for the next diff

    @property
    def files(self) -> int:
        return sum(1 for _, m in self.entries if m.type == "file")


@dataclass
class TransferStats:
    files: int = 0  # file records (hardlinks not included)
    bytes: int = 0  # file content bytes (logical sizes; holes count)
    wire_bytes: int = 0  # bytes of the stream itself (compressed size if compressed)
    seconds: float = 0.0
    entries: int = 0  # all records but the end record
    # sender only: files that vanished, changed type or shrank between plan and send; what
    # was sent for them is consistent but stale, a later incremental pass resends them.
    unstable: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- paths / dirs


def _check_path(path: object, *, allow_root: bool = False) -> str:
    """Validate a relative tree path; returns "" for the root ("."). Raises ValueError."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"bad path {path!r}")
    if path == ".":
        if allow_root:
            return ""
        raise ValueError("the tree root is not allowed here")
    if path.startswith("/"):
        raise ValueError(f"absolute path {path!r}")
    if "\0" in path or len(path) > 4095:
        raise ValueError(f"bad path {path[:200]!r}")
    for part in path.split("/"):
        if part in ("", ".", "..") or len(part) > 255:
            raise ValueError(f"bad path component {part!r} in {path[:200]!r}")
    return path


class _Dirs:
    """Directory fds under a root fd, opened one component at a time without following
    symlinks (a symlinked component fails with ELOOP/ENOTDIR). Caches the last one."""

    def __init__(self, root_fd: int):
        self.root = root_fd
        self._key = ""
        self._fd = root_fd

    def open(self, rel: str) -> int:
        """fd (O_PATH) of directory `rel` ("" = root). Owned by the cache: do not close."""
        if rel == self._key:
            return self._fd
        if not rel:
            self.invalidate()
            return self.root
        if self._key and rel.startswith(self._key + "/"):
            fd = self._walk(self._fd, rel[len(self._key) + 1 :])
        else:
            fd = self._walk(self.root, rel)
        self.invalidate()
        self._key, self._fd = rel, fd
        return fd

    def open_private(self, rel: str) -> int:
        """Like open() but returns an fd the caller must close (or the root fd: check)."""
        return self._walk(self.root, rel) if rel else self.root

    @staticmethod
    def _walk(start: int, rel: str) -> int:
        fd = start
        try:
            for part in rel.split("/") if rel else ():
                nfd = os.open(part, _DIR_PATH, dir_fd=fd)
                if fd != start:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != start:
                os.close(fd)
            raise
        return fd

    def invalidate(self) -> None:
        if self._fd != self.root:
            os.close(self._fd)
        self._key, self._fd = "", self.root

    def close(self) -> None:
        self.invalidate()


def _meta(st: os.stat_result, target: str | None) -> FileMeta | None:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:  # sockets, whiteouts: not transferable
        return None
    return FileMeta(
        type=kind,
        size=st.st_size if kind == "file" else 0,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        target=target,
        rdev=st.st_rdev if kind in ("chr", "blk") else 0,
        inode=(st.st_dev, st.st_ino),
        nlink=st.st_nlink,
    )


# --------------------------------------------------------------------------- manifests


def scan_tree(root: Path | str) -> Manifest:
    """lstat every entry under `root` (never following symlinks); sockets are skipped."""
    manifest = Manifest(scanned_ns=time.time_ns())
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        meta = _meta(os.fstat(root_fd), None)
        assert meta is not None
        manifest["."] = meta
        _scan_dir(root_fd, "", manifest)
    finally:
        os.close(root_fd)
    return manifest


def _scan_dir(fd: int, prefix: str, out: Manifest) -> None:
    with os.scandir(fd) as it:
        entries = list(it)
    subdirs = []
    for e in entries:
        rel = prefix + e.name
        try:
            st = e.stat(follow_symlinks=False)
            target = os.readlink(e.name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
        except FileNotFoundError:
            continue  # raced with a deletion
        meta = _meta(st, target)
        if meta is None:
            continue
        out[rel] = meta
        if meta.type == "dir":
            subdirs.append((e.name, rel))
    for name, rel in subdirs:
        try:
            sub = os.open(name, _DIR_READ, dir_fd=fd)
        except OSError as e:
            if e.errno in _GONE:
                continue  # replaced or removed since the lstat
            raise
        try:
            _scan_dir(sub, rel + "/", out)
        finally:
            os.close(sub)


def diff_manifests(old: Manifest, new: Manifest) -> tuple[list[str], list[str]]:
    """(changed, deleted) between two scans of one tree, both sorted.

    changed: paths of `new` that are new or whose metadata differs (content changes show
    as mtime/ctime/size changes), plus entries changed too shortly before the `old` scan to
    be trusted (a later change in the same timestamp tick would be invisible). All links
    of a hardlink group share one inode, hence one ctime: when one is changed (including
    adding or removing a link) all are, and the receiver rebuilds the group.
    deleted: paths of `old` missing from `new`, reduced to the top-most ones (deleting a
    directory removes its subtree).
    """
    racy = getattr(old, "scanned_ns", 0) - RACY_NS
    changed = [
        path
        for path, meta in new.items()
        if (prev := old.get(path)) is None
        or prev != meta
        or max(prev.ctime_ns, prev.mtime_ns) >= racy
    ]
    return sorted(changed), _top_most(p for p in old if p not in new)


def _top_most(paths: Iterable[str]) -> list[str]:
    """Sorted paths without those that have an ancestor in the set."""
    pset = set(paths)
    out = []
    for p in sorted(pset):
        head = p
        while "/" in head:
            head = head.rpartition("/")[0]
            if head in pset:
                break
        else:
            out.append(p)
    return out


def plan_tree(
    root: Path | str, paths: Iterable[str] | None = None, deleted: Iterable[str] = ()
) -> TreePlan:
    """Plan a transfer of `root`: the whole tree (paths=None) or only `paths` plus
    `deleted` records. Paths of `paths` that no longer exist become deletions."""
    root = Path(root)
    dels = {_check_path(p) for p in deleted}
    manifest = None
    if paths is None:
        manifest = scan_tree(root)
        entries = sorted(manifest.items())
    else:
        entries = []
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        dirs = _Dirs(root_fd)
        try:
            for p in sorted(set(paths)):
                rel = _check_path(p, allow_root=True)
                try:
                    if rel:
                        head, _, name = rel.rpartition("/")
                        fd = dirs.open(head)
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
                    else:
                        st, target = os.fstat(root_fd), None
                except OSError as e:
                    if e.errno not in _GONE:
                        raise
                    dels.add(rel)
                    continue
                meta = _meta(st, target)
                if meta is not None:
                    entries.append((rel or ".", meta))
        finally:
            dirs.close()
            os.close(root_fd)
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, m in entries:
        if m.type == "file" and m.inode not in seen:
            seen.add(m.inode)
            total += m.size
    sent = {p for p, _ in entries}
    return TreePlan(root, entries, _top_most(dels - sent), total, manifest)


# --------------------------------------------------------------------------- sender


def _record(header: dict) -> bytes:
    js = json.dumps(header, separators=(",", ":")).encode()
    return len(js).to_bytes(4, "big") + js


def _data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Data ranges of a sparse file, None to send it dense."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole up to EOF
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            if len(out) > MAX_EXTENTS:
                return None
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    return out


class _Framer:
    """Synchronous producer of the wire stream for one plan (runs in a worker thread)."""

    def __init__(self, plan: TreePlan, stats: TransferStats, compress: bool, level: int, chunk,
                 tamper: Callable[[bytes], bytes] | None = None):
        self.plan = plan
        self.tamper = tamper  # tests only (godwit.faults): alters data after hashing
        self.stats = stats
        self.compress = compress
        self.level = level
        self.chunk = chunk
        self.done = 0  # progress: file content bytes read (logical)

    def wire(self) -> Iterator[tuple[bytes, int]]:
        """(wire chunk, progress after it)."""
        out = bytearray(MAGIC + bytes([VERSION, FLAG_ZSTD if self.compress else 0]))
        comp = None
        if self.compress:  # threads=1: libzstd compresses while this thread reads and hashes
            comp = zstandard.ZstdCompressor(level=self.level, threads=1).compressobj()
        for piece in self._records():
            if comp is not None:
                piece = comp.compress(piece)
            if len(piece) >= _WIRE_FLUSH:
                if out:
                    yield bytes(out), self.done
                    out.clear()
                yield piece, self.done
            elif piece:
                out += piece
                if len(out) >= _WIRE_FLUSH:
                    yield bytes(out), self.done
                    out.clear()
        if comp is not None:
            out += comp.flush()
        if out:
            yield bytes(out), self.done

    def _records(self) -> Iterator[bytes]:
        plan, stats = self.plan, self.stats
        for path in plan.deleted:
            stats.entries += 1
            yield _record({"type": "delete", "path": path})
        root_fd = os.open(plan.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        dirs = _Dirs(root_fd)
        sent_inodes: dict[tuple[int, int], str] = {}
        try:
            for path, meta in plan.entries:
                if meta.type == "file":
                    yield from self._file(dirs, path, sent_inodes)
                    continue
                h: dict = {"type": meta.type, "path": path, "uid": meta.uid, "gid": meta.gid}
                h["mtime_ns"] = meta.mtime_ns
                if meta.type == "symlink":
                    h["target"] = meta.target
                else:
                    h["mode"] = meta.mode
                if meta.type in ("chr", "blk"):
                    h["rdev"] = meta.rdev
                stats.entries += 1
                yield _record(h)
        finally:
            dirs.close()
            os.close(root_fd)
        yield _record(
            {"type": "end", "entries": stats.entries, "files": stats.files, "bytes": stats.bytes}
        )

    def _file(self, dirs: _Dirs, path: str, sent_inodes: dict) -> Iterator[bytes]:
        # The tree may belong to a running, hostile container: never open() what is not a
        # regular file (a device node swapped in would be opened outside its cgroup).
        head, _, name = path.rpartition("/")
        try:
            pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs.open(head))
            try:
                st = os.fstat(pfd)
                fd = -1
                if stat.S_ISREG(st.st_mode):  # reopen this very inode for reading
                    fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
            finally:
                os.close(pfd)
        except OSError as e:
            if e.errno not in _GONE:
                raise TransferError(f"{path}: {e.strerror}") from e
            fd = -1
        if fd < 0:
            self.stats.unstable.append(path)
            return
        try:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if key in sent_inodes:
                    self.stats.entries += 1
                    yield _record({"type": "hardlink", "path": path, "target": sent_inodes[key]})
                    return
                sent_inodes[key] = path
            size = st.st_size
            extents = _data_extents(fd, size) if st.st_blocks * 512 < size else None
            h = {"type": "file", "path": path, "mode": stat.S_IMODE(st.st_mode)}
            h.update(uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, size=size)
            if extents is not None:
                h["extents"] = extents
            self.stats.entries += 1
            self.stats.files += 1
            self.stats.bytes += size
            yield _record(h)
            digest = hashlib.sha256()
            base, short = self.done, False
            for off, length in extents if extents is not None else [(0, size)]:
                pos, end = off, off + length
                while pos < end:
                    n = min(self.chunk, end - pos)
                    data = b"" if short else os.pread(fd, n, pos)
                    if len(data) < n:  # the file shrank while we read it: pad with zeros
                        short = True
                        data += bytes(n - len(data))
                    digest.update(data)
                    if self.tamper:
                        data = self.tamper(data)
                    pos += n
                    self.done = base + pos
                    yield data
            self.done = base + size
            if short:
                self.stats.unstable.append(path)
            yield digest.digest()
        except OSError as e:
            raise TransferError(f"{path}: {e.strerror}") from e
        finally:
            os.close(fd)


class _TokenBucket:
    """Rate limiter: capacity of 50 ms worth of bytes, slices chunks to that size."""

    def __init__(self, rate: float):
        if not rate > 0:
            raise ValueError(f"rate_limit must be > 0, not {rate!r}")
        self.rate = float(rate)
        self.piece = int(min(1 << 20, max(1024, rate * 0.05)))
        self.tokens = float(self.piece)
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.piece, self.tokens + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


_DONE = object()


class TreeStream:
    """The wire stream of one plan: an async iterable of bytes (single use), usable as
    aiohttp ``data=``. Files are read, hashed (and compressed) by a producer thread that
    runs a few chunks ahead; `stats` is complete once iteration has finished."""

    def __init__(
        self,
        plan: TreePlan,
        *,
        compress: bool = False,
        level: int = 1,
        rate_limit: float | None = None,
        on_progress: Callable[[int], None] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        tamper: Callable[[bytes], bytes] | None = None,
    ):
        if not 4096 <= chunk_size <= 64 << 20:
            raise ValueError(f"chunk_size out of range: {chunk_size}")
        self.plan = plan
        self.stats = TransferStats()
        self._framer = _Framer(plan, self.stats, compress, level, chunk_size, tamper)
        self._bucket = _TokenBucket(rate_limit) if rate_limit is not None else None
        self._on_progress = on_progress
        self._used = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError("a TreeStream can be iterated only once")
        self._used = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        slots = threading.Semaphore(_QUEUE_DEPTH)
        stop = threading.Event()

        def put(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                for item in self._framer.wire():
                    while not slots.acquire(timeout=1.0):
                        if stop.is_set() or loop.is_closed():
                            return
                    if stop.is_set():
                        return
                    put(item)
                put(_DONE)
            except BaseException as e:  # handed to the consumer
                put(e)

        t0 = time.monotonic()
        stats, bucket, progress = self.stats, self._bucket, self._on_progress
        thread = threading.Thread(target=produce, name="godwit-send", daemon=True)
        thread.start()
        reported = 0
        try:
            while True:
                item = await queue.get()
                slots.release()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if isinstance(item, TransferError):
                        raise item
                    raise TransferError(f"sender failed: {item!r}") from item
                data, done = item
                if bucket is None:
                    yield data
                    stats.wire_bytes += len(data)
                    if progress is not None and done > reported:
                        progress(done)
                else:  # slices of 50 ms; progress interpolated over the chunk
                    for off in range(0, len(data), bucket.piece):
                        piece = data[off : off + bucket.piece]
                        await bucket.take(len(piece))
                        yield piece
                        stats.wire_bytes += len(piece)
                        if progress is not None and done > reported:
                            progress(reported + (done - reported) * (off + len(piece)) // len(data))
                reported = done
        finally:
            stop.set()
            slots.release()  # wake the producer if it waits for a slot
            stats.seconds = time.monotonic() - t0


send_tree = TreeStream  # send_tree(plan, compress=, rate_limit=, on_progress=) -> the stream


# --------------------------------------------------------------------------- receiver

_S_MAGIC, _S_LEN, _S_HEADER, _S_DATA, _S_TRAILER, _S_DONE, _S_FAILED = range(7)


class _Sink:
    def __init__(self, fn: Callable[[bytes], None]):
        self.write = fn


@dataclass
class _Incoming:
    path: str
    head: str
    name: str
    tmp: str
    fd: int
    header: dict
    size: int
    remaining: int
    extents: list[tuple[int, int]] | None
    sha: hashlib._Hash = field(default_factory=hashlib.sha256)
    offset: int = 0  # dense files: next write offset
    ext_i: int = 0
    ext_pos: int = 0
    writes: deque = field(default_factory=deque)  # pending writer-thread futures

    def wait_writes(self) -> None:
        while self.writes:
            self.writes.popleft().result()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise TransferError(f"malformed header: bad {key} {v!r} for {str(h.get('path'))[:200]!r}")
    return v


class TreeReceiver:
    """Synchronous receiver core, no asyncio: `feed()` stream bytes in any pieces, then
    `finish()`. Blocking file I/O: run it in a worker thread (as `receive_tree` does).
    On error it raises `TransferError` and cleans up (see `abort`)."""

    def __init__(self, dest: Path | str):
        os.makedirs(dest, exist_ok=True)
        self.dest = Path(dest)
        self._root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs = _Dirs(self._root_fd)
        self._state = _S_MAGIC
        self._need = len(MAGIC) + 2
        self._buf = bytearray()
        self._zw: zstandard.ZstdDecompressionWriter | None = None
        self._cur: _Incoming | None = None
        self._path = ""  # for error messages
        self._dir_meta: dict[str, tuple[int, int]] = {}  # rel -> (mode, mtime_ns), deferred
        self._touched: dict[str, tuple[int, int]] = {}  # rel -> original (atime, mtime)
        self._tmp_prefix = f".godwit-tmp.{secrets.token_hex(4)}."
        self._tmp_n = 0
        self._chown = os.geteuid() == 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self.stats = TransferStats()
        self._t0 = time.monotonic()

    @property
    def bytes_done(self) -> int:
        return self.stats.bytes

    # ---- input

    def feed(self, data: bytes) -> None:
        if self._state == _S_FAILED:
            raise TransferError("receiver already failed")
        self.stats.wire_bytes += len(data)
        try:
            if self._zw is not None:
                self._zw.write(data)
            else:
                self._consume(data)
        except TransferError:
            self.abort()
            raise
        except zstandard.ZstdError as e:
            self.abort()
            raise TransferError(f"corrupt zstd stream: {e}") from e
        except OSError as e:
            self.abort()
            where = f"{self._path}: " if self._path else ""
            raise TransferError(f"{where}{e.strerror or e}") from e
        except ValueError as e:  # path validation
            self.abort()
            raise TransferError(f"rejected path: {e}") from e

    def feed_many(self, pieces: Iterable[bytes]) -> None:
        for data in pieces:
            self.feed(data)

    def finish(self) -> TransferStats:
        """Check the stream was complete, apply directory metadata, return the stats."""
        if self._state != _S_DONE:
            what = "inside file " + repr(self._cur.path) if self._cur else "before the end record"
            self.abort()
            raise TransferError(f"truncated stream: ended {what}")
        try:
            self._apply_dirs()
        except OSError as e:
            self.abort()
            raise TransferError(f"{self._path}: {e.strerror or e}") from e
        self._close()
        self.stats.seconds = time.monotonic() - self._t0
        return self.stats

    def abort(self) -> None:
        """Drop the file being received (its temporary name) and close everything."""
        if self._state == _S_FAILED:
            return
        self._state = _S_FAILED
        cur, self._cur = self._cur, None
        if cur is not None:
            for f in cur.writes:
                with contextlib.suppress(OSError):
                    f.result()
            with contextlib.suppress(OSError):
                os.close(cur.fd)
            with contextlib.suppress(OSError):
                os.unlink(cur.tmp, dir_fd=self._dirs.open(cur.head))
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=False)
            self._writer = None
        if self._root_fd < 0:
            return
        self._dirs.close()
        os.close(self._root_fd)
        self._root_fd = -1

    def _consume(self, data: bytes) -> None:
        mv = memoryview(data)
        pos, n = 0, len(mv)
        if self._state == _S_MAGIC:
            k = min(self._need - len(self._buf), n)
            self._buf += mv[:k]
            pos = k
            if len(self._buf) < self._need:
                return
            self._start(bytes(self._buf))
            self._buf.clear()
            if self._zw is not None:
                if pos < n:
                    self._zw.write(mv[pos:])
                return
        while pos < n:
            state = self._state
            if state == _S_DATA:
                k = min(self._cur.remaining, n - pos)
                self._write(mv[pos : pos + k])
                pos += k
                if self._cur.remaining == 0:
                    self._state, self._need = _S_TRAILER, DIGEST_LEN
                continue
            if state == _S_DONE:
                raise TransferError("trailing data after the end record")
            need = self._need
            if not self._buf and n - pos >= need:
                chunk = mv[pos : pos + need]
                pos += need
            else:
                k = min(need - len(self._buf), n - pos)
                self._buf += mv[pos : pos + k]
                pos += k
                if len(self._buf) < need:
                    return
                chunk = memoryview(bytes(self._buf))
                self._buf.clear()
            if state == _S_LEN:
                hlen = int.from_bytes(chunk, "big")
                if not 0 < hlen <= MAX_HEADER:
                    raise TransferError(f"malformed stream: header length {hlen}")
                self._state, self._need = _S_HEADER, hlen
            elif state == _S_HEADER:
                self._header(bytes(chunk))
            else:  # _S_TRAILER
                self._commit_file(bytes(chunk))

    def _start(self, magic: bytes) -> None:
        if magic[: len(MAGIC)] != MAGIC:
            raise TransferError("not a godwit tree stream (bad magic)")
        version, flags = magic[len(MAGIC)], magic[len(MAGIC) + 1]
        if version != VERSION:
            raise TransferError(f"unsupported tree stream version {version}")
        if flags & ~FLAG_ZSTD:
            raise TransferError(f"unknown tree stream flags {flags:#x}")
        if flags & FLAG_ZSTD:
            self._zw = zstandard.ZstdDecompressor().stream_writer(
                _Sink(self._consume), write_size=_RECV_BATCH, closefd=False
            )
        self._state, self._need = _S_LEN, 4

    # ---- records

    def _header(self, raw: bytes) -> None:
        try:
            h = json.loads(raw)
        except ValueError as e:
            raise TransferError(f"malformed header: {e}") from e
        if not isinstance(h, dict):
            raise TransferError("malformed header: not an object")
        kind = h.get("type")
        self._state, self._need = _S_LEN, 4
        if kind == "end":
            self._end(h)
            return
        self._path = str(h.get("path"))[:200]
        rel = _check_path(h.get("path"), allow_root=kind == "dir")
        self.stats.entries += 1
        self._touched.pop(rel, None)  # its own times come from this record, if any
        if kind == "file":
            self._begin_file(rel, h)
        elif kind == "dir":
            self._mkdir(rel, h)
        elif kind == "symlink":
            self._symlink(rel, h)
        elif kind in _NODE_TYPES:
            self._mknod(rel, h, kind)
        elif kind == "hardlink":
            self._hardlink(rel, h)
        elif kind == "delete":
            self._delete(rel)
        else:
            raise TransferError(f"malformed header: unknown type {str(kind)[:40]!r}")

    def _end(self, h: dict) -> None:
        s = self.stats
        got = {"entries": s.entries, "files": s.files, "bytes": s.bytes}
        want = {k: h.get(k) for k in got}
        if got != want:
            raise TransferError(f"end record mismatch: stream says {want}, received {got}")
        self._state = _S_DONE

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

    def _owner(self, h: dict) -> tuple[int, int]:
        return _int(h, "uid", 0, 2**32 - 2), _int(h, "gid", 0, 2**32 - 2)

    def _place(self, fd: int, tmp: str, name: str) -> None:
        """Rename tmp over name, replacing whatever is there (a directory recursively)."""
        try:
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except IsADirectoryError:
            self._remove(fd, name)
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise

    def _remove(self, fd: int, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)

    def _begin_file(self, rel: str, h: dict) -> None:
        size = _int(h, "size", 0, 2**62)
        _int(h, "mode", 0, 0o7777)
        _int(h, "mtime_ns", -(2**63), 2**63 - 1)
        self._owner(h)
        extents = h.get("extents")
        if extents is not None:
            extents = self._check_extents(extents, size)
        fd_dir, name = self._parent(rel)
        tmp = self._tmp()
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=fd_dir,
        )  # fmt: skip
        data_len = size if extents is None else sum(ln for _, ln in extents)
        head = rel.rpartition("/")[0]
        self._cur = _Incoming(rel, head, name, tmp, fd, h, size, data_len, extents)
        if extents is not None:
            os.ftruncate(fd, size)
        self._state = _S_DATA if data_len else _S_TRAILER
        self._need = DIGEST_LEN

    @staticmethod
    def _check_extents(extents: object, size: int) -> list[tuple[int, int]]:
        if not isinstance(extents, list) or len(extents) > MAX_EXTENTS:
            raise TransferError("malformed header: bad extents")
        out, end = [], 0
        for e in extents:
            if (
                not isinstance(e, list)
                or len(e) != 2
                or type(e[0]) is not int
                or type(e[1]) is not int
                or e[0] < end
                or e[1] <= 0
                or e[0] + e[1] > size
            ):
                raise TransferError("malformed header: bad extents")
            out.append((e[0], e[1]))
            end = e[0] + e[1]
        return out

    def _write(self, mv: memoryview) -> None:
        """Big pieces go to the writer thread (hashing here runs meanwhile), small ones
        are written inline; offsets are explicit so the order does not matter."""
        cur = self._cur
        cur.remaining -= len(mv)
        if cur.extents is None:
            self.stats.bytes += len(mv)
            self._pwrite(cur, mv, cur.offset)
            cur.offset += len(mv)
        else:
            rest = mv
            while rest:
                off, length = cur.extents[cur.ext_i]
                k = min(length - cur.ext_pos, len(rest))
                self._pwrite(cur, rest[:k], off + cur.ext_pos)
                rest = rest[k:]
                cur.ext_pos += k
                if cur.ext_pos == length:
                    cur.ext_i += 1
                    cur.ext_pos = 0
        cur.sha.update(mv)

    def _pwrite(self, cur: _Incoming, data: memoryview, offset: int) -> None:
        if len(data) < _ASYNC_WRITE_MIN:
            _pwrite_all(cur.fd, data, offset)
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "godwit-write")
        cur.writes.append(self._writer.submit(_pwrite_all, cur.fd, data, offset))
        while len(cur.writes) > _WRITES_INFLIGHT:
            cur.writes.popleft().result()

    def _commit_file(self, digest: bytes) -> None:
        cur = self._cur
        cur.wait_writes()
        if digest != cur.sha.digest():
            raise TransferError(f"{cur.path[:200]}: sha256 mismatch")
        h = cur.header
        if self._chown:
            os.fchown(cur.fd, *self._owner(h))
        os.fchmod(cur.fd, h["mode"])
        os.utime(cur.fd, ns=(h["mtime_ns"], h["mtime_ns"]))
        os.close(cur.fd)
        self._cur = None
        if cur.extents is not None:
            self.stats.bytes += cur.size
        self.stats.files += 1
        fd_dir = self._dirs.open(cur.head)
        try:
            self._place(fd_dir, cur.tmp, cur.name)
        except OSError as e:
            raise TransferError(f"{cur.path[:200]}: {e.strerror or e}") from e
        self._state, self._need = _S_LEN, 4

    def _mkdir(self, rel: str, h: dict) -> None:
        mode = _int(h, "mode", 0, 0o7777)
        mtime = _int(h, "mtime_ns", -(2**63), 2**63 - 1)
        uid, gid = self._owner(h)
        if rel:
            fd, name = self._parent(rel)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=fd)
                st = None
            if st is None:
                os.mkdir(name, 0o700, dir_fd=fd)
            if self._chown:
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        elif self._chown:
            os.fchown(self._root_fd, uid, gid)
        self._dir_meta[rel] = (mode, mtime)

    def _symlink(self, rel: str, h: dict) -> None:
        target = h.get("target")
        if not isinstance(target, str) or not target or "\0" in target or len(target) > 4095:
            raise TransferError(f"malformed header: bad symlink target for {rel[:200]!r}")
        mtime = _int(h, "mtime_ns", -(2**63), 2**63 - 1)
        uid, gid = self._owner(h)
        fd, name = self._parent(rel)
        tmp = self._tmp()
        os.symlink(target, tmp, dir_fd=fd)
        try:
            if self._chown:
                os.chown(tmp, uid, gid, dir_fd=fd, follow_symlinks=False)
            os.utime(tmp, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)
        except BaseException:
            os.unlink(tmp, dir_fd=fd)
            raise
        self._place(fd, tmp, name)

    def _mknod(self, rel: str, h: dict, kind: str) -> None:
        mode = _int(h, "mode", 0, 0o7777)
        mtime = _int(h, "mtime_ns", -(2**63), 2**63 - 1)
        rdev = _int(h, "rdev", 0, 2**64 - 1) if kind != "fifo" else 0
        uid, gid = self._owner(h)
        fd, name = self._parent(rel)
        tmp = self._tmp()
        os.mknod(tmp, mode | _NODE_TYPES[kind], rdev, dir_fd=fd)
        try:
            if self._chown:
                os.chown(tmp, uid, gid, dir_fd=fd, follow_symlinks=False)
            os.chmod(tmp, mode, dir_fd=fd)  # mknod applies the umask; tmp is our new node
            os.utime(tmp, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)
        except BaseException:
            os.unlink(tmp, dir_fd=fd)
            raise
        self._place(fd, tmp, name)

    def _hardlink(self, rel: str, h: dict) -> None:
        try:
            target = _check_path(h.get("target"))
        except ValueError as e:
            raise TransferError(f"rejected hardlink target: {e}") from e
        thead, _, tname = target.rpartition("/")
        try:
            tfd = self._dirs.open_private(thead)
        except OSError as e:
            raise TransferError(f"{rel[:200]}: hardlink target {target[:200]!r} missing") from e
        try:
            try:
                st = os.stat(tname, dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise TransferError(f"{rel[:200]}: hardlink target {target[:200]!r} missing")
            fd, name = self._parent(rel)
            with contextlib.suppress(FileNotFoundError):
                cur = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
                    return  # already this link (rename() would leave tmp behind)
            tmp = self._tmp()
            os.link(tname, tmp, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
            self._place(fd, tmp, name)
        finally:
            if tfd != self._root_fd:
                os.close(tfd)

    def _delete(self, rel: str) -> None:
        if not rel:
            raise TransferError("rejected path: cannot delete the tree root")
        try:
            self._dirs.open(rel.rpartition("/")[0])
        except FileNotFoundError:
            return  # already gone with its parent
        except OSError:
            pass  # _parent() explains
        fd, name = self._parent(rel)
        self._remove(fd, name)

    def _apply_dirs(self) -> None:
        """Deepest first: modes and mtimes of received directories, then restore the
        mtimes of the other directories we modified."""
        for rel in sorted(self._dir_meta, reverse=True):
            self._path = rel or "."
            mode, mtime = self._dir_meta[rel]
            if rel:
                head, _, name = rel.rpartition("/")
                fd = os.open(name, _DIR_READ, dir_fd=self._dirs.open(head))
            else:
                fd = self._root_fd
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                if fd != self._root_fd:
                    os.close(fd)
        for rel in sorted(self._touched, reverse=True):
            if rel in self._dir_meta:
                continue
            self._path = rel or "."
            times = self._touched[rel]
            if not rel:
                os.utime(self._root_fd, ns=times)
                continue
            head, _, name = rel.rpartition("/")
            try:  # it may have been deleted or replaced later in the stream
                fd = self._dirs.open(head)
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.utime(name, ns=times, dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                if e.errno not in _GONE:
                    raise


async def receive_tree(
    stream: AsyncIterable[bytes],
    dest: Path | str,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> TransferStats:
    """Receive a tree stream (an aiohttp ``StreamReader`` such as ``request.content``, or
    any async iterable of bytes) into `dest`, created if needed. Parsing, hashing and file
    I/O run in one worker thread while the event loop reads the next piece.
    `on_progress(bytes_done)` is called on the event loop. Raises `TransferError`."""
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="godwit-recv")
    try:
        core = await loop.run_in_executor(executor, TreeReceiver, dest)
    except OSError as e:
        executor.shutdown(wait=False)
        raise TransferError(f"{dest}: {e.strerror or e}") from e
    iterator = stream.iter_any() if hasattr(stream, "iter_any") else aiter(stream)
    pending: deque[asyncio.Future] = deque()  # feeds queued in the (FIFO) worker

    async def settle(keep: int) -> None:
        while len(pending) > keep:
            await pending.popleft()
            if on_progress is not None:
                on_progress(core.bytes_done)

    buf: list[bytes] = []
    buffered = 0
    try:
        try:
            async for data in iterator:
                buf.append(data)
                buffered += len(data)
                if buffered >= _RECV_BATCH:
                    await settle(_RECV_INFLIGHT - 1)
                    pending.append(loop.run_in_executor(executor, core.feed_many, buf))
                    buf, buffered = [], 0
        except (TransferError, asyncio.CancelledError):
            raise
        except Exception as e:
            await settle(0)  # a parse error there is the better message
            raise TransferError(f"stream broken: {e!r}"[:300]) from e
        if buf:
            pending.append(loop.run_in_executor(executor, core.feed_many, buf))
        await settle(0)
        stats = await loop.run_in_executor(executor, core.finish)
        if on_progress is not None:
            on_progress(stats.bytes)
        return stats
    except BaseException:
        for fut in pending:  # feeds after a failed one fail too: nobody needs to know
            if fut.done() and not fut.cancelled():
                fut.exception()
            else:
                fut.cancel()
        executor.submit(core.abort)  # after any feed still running in the worker
        raise
    finally:
        executor.shutdown(wait=False)
