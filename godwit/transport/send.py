"""The sending side: a `TreePlan` as an async iterable of wire bytes (an HTTP PUT body).

A producer thread reads, hashes and (optionally) compresses the files a few chunks ahead
of the event loop, which only hands the chunks on, paced by an optional rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import zstandard

from godwit.transport.manifest import FileMeta, TreePlan
from godwit.transport.safefs import (
    GONE,
    DirFds,
    data_extents,
    entry_path,
    get_xattrs,
    open_regular,
    tree_dirs,
)
from godwit.transport.wire import (
    DEFAULT_DIGEST,
    DEVICE_TYPES,
    INLINE_MAX_BYTES,
    INLINE_MAX_ENTRIES,
    MAX_EXTENTS,
    TransferError,
    TransferStats,
    carried_xattr,
    encode_record,
    encode_xattrs,
    end_header,
    new_hasher,
    stream_header,
)

DEFAULT_CHUNK = 1 << 20
_WIRE_FLUSH = 256 << 10  # batch small records into wire chunks of about this size
_QUEUE_DEPTH = 4  # wire chunks the sender thread may run ahead
_DONE = object()

Chunk = tuple[bytes, int]  # a piece of the wire stream, file bytes read once it is sent


class _Framer:
    """Synchronous producer of the wire stream for one plan (runs in a worker thread)."""

    def __init__(self, plan: TreePlan, stats: TransferStats, compress: bool, level: int,
                 chunk: int, tamper: Callable[[bytes], bytes] | None = None,
                 digest: str = DEFAULT_DIGEST):
        self.plan = plan
        self.header = stream_header(compress, digest)  # a bad argument fails here
        self.digest = digest  # the file digests' algorithm (wire.SHA256 or wire.BLAKE3)
        self.tamper = tamper  # tests only (godwit.faults): alters data after hashing
        self.stats = stats
        self.compress = compress
        self.level = level
        self.chunk = chunk
        self.done = 0  # progress: file content bytes read (logical)

    def wire(self) -> Iterator[Chunk]:
        """(wire chunk, progress after it): big pieces go out as they are, small ones
        (records, small files) are gathered into chunks of about `_WIRE_FLUSH` first."""
        out = bytearray(self.header)
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
        stats = self.stats
        for path in self.plan.deleted:
            stats.entries += 1
            yield encode_record({"type": "delete", "path": path})
        with tree_dirs(self.plan.root) as dirs:
            sent_inodes: dict[tuple[int, int], str] = {}
            for path, meta in self.plan.entries:
                if meta.type == "file":
                    yield from self._file(dirs, path, sent_inodes)
                else:
                    stats.entries += 1
                    yield encode_record(_entry_header(path, meta, _entry_xattrs(dirs, path)))
        yield encode_record(end_header(stats))

    def _file(self, dirs: DirFds, path: str, sent_inodes: dict) -> Iterator[bytes]:
        """A file record with its data and digest, or a hardlink record to a file sent."""
        opened = self._open(dirs, path)
        if opened is None:
            self.stats.unstable.append(path)
            return
        fd, st = opened
        try:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in sent_inodes:
                self.stats.entries += 1
                yield encode_record({"type": "hardlink", "path": path, "target": sent_inodes[key]})
                return
            if st.st_nlink > 1:
                sent_inodes[key] = path
            extents = _sparse_extents(fd, st)
            yield self._file_record(path, st, extents, get_xattrs(fd, carried_xattr))
            ranges = extents if extents is not None else [(0, st.st_size)]
            yield from self._file_data(fd, path, st.st_size, ranges)
        except OSError as e:
            raise TransferError(f"{path}: {e.strerror}") from e
        finally:
            os.close(fd)

    @staticmethod
    def _open(dirs: DirFds, path: str) -> tuple[int, os.stat_result] | None:
        head, _, name = path.rpartition("/")
        try:
            return open_regular(dirs.open(head), name)
        except OSError as e:
            raise TransferError(f"{path}: {e.strerror}") from e

    def _file_record(self, path: str, st: os.stat_result,
                     extents: list[tuple[int, int]] | None, xattrs: dict[str, bytes]) -> bytes:
        h = {"type": "file", "path": path, "mode": stat.S_IMODE(st.st_mode)}
        h.update(uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, size=st.st_size)
        if extents is not None:
            h["extents"] = extents
        if xattrs:
            h["xattrs"] = encode_xattrs(xattrs)
        self.stats.entries += 1
        self.stats.files += 1
        self.stats.bytes += st.st_size
        return encode_record(h)

    def _file_data(self, fd: int, path: str, size: int,
                   ranges: list[tuple[int, int]]) -> Iterator[bytes]:
        """The data of `ranges` in chunks, then its digest."""
        digest = new_hasher(self.digest)
        base = self.done
        reader = _PaddedReader(fd)
        for off, length in ranges:
            end = off + length
            for pos in range(off, end, self.chunk):
                n = min(self.chunk, end - pos)
                data = reader.read(pos, n)
                digest.update(data)
                if self.tamper:
                    data = self.tamper(data)
                self.done = base + pos + n
                yield data
        self.done = base + size
        if reader.short:
            self.stats.unstable.append(path)
        yield digest.digest()


class _PaddedReader:
    """pread() that pads with zeros once the file turned out shorter than planned (it
    shrank while being read: the digest stays consistent with what is sent)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.short = False

    def read(self, pos: int, n: int) -> bytes:
        data = b"" if self.short else os.pread(self.fd, n, pos)
        if len(data) < n:
            self.short = True
            data += bytes(n - len(data))
        return data


def _sparse_extents(fd: int, st: os.stat_result) -> list[tuple[int, int]] | None:
    """The data ranges of a file with holes; None to send it dense."""
    if st.st_blocks * 512 >= st.st_size:
        return None
    return data_extents(fd, st.st_size, MAX_EXTENTS)


def _entry_header(path: str, meta: FileMeta, xattrs: dict[str, bytes]) -> dict:
    """The record header of anything but a regular file."""
    h: dict = {"type": meta.type, "path": path, "uid": meta.uid, "gid": meta.gid}
    h["mtime_ns"] = meta.mtime_ns
    if meta.type == "symlink":
        h["target"] = meta.target
    else:
        h["mode"] = meta.mode
    if meta.type in DEVICE_TYPES:
        h["rdev"] = meta.rdev
    if xattrs:
        h["xattrs"] = encode_xattrs(xattrs)
    return h


def _entry_xattrs(dirs: DirFds, path: str) -> dict[str, bytes]:
    """The carried extended attributes of a tree entry ("." is the root), {} if it is gone."""
    if path == ".":
        return get_xattrs(dirs.root, carried_xattr)
    head, _, name = path.rpartition("/")
    try:
        return get_xattrs(entry_path(dirs.open(head), name), carried_xattr)
    except OSError as e:
        if e.errno in GONE:
            return {}  # removed since the scan: its record is stale, a later pass sends it
        raise TransferError(f"{path}: {e.strerror}") from e


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


class _Producer:
    """Runs a chunk iterator in a thread, at most `_QUEUE_DEPTH` chunks ahead of `get`."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._slots = threading.Semaphore(_QUEUE_DEPTH)
        self._stop = threading.Event()
        threading.Thread(target=self._produce, name="godwit-send", daemon=True).start()

    async def get(self) -> Chunk | None:
        """The next chunk, None at the end; the producer's failure as a TransferError."""
        item = await self._queue.get()
        self._slots.release()
        if item is _DONE:
            return None
        if isinstance(item, TransferError):
            raise item
        if isinstance(item, BaseException):
            raise TransferError(f"sender failed: {item!r}") from item
        return item

    def stop(self) -> None:
        self._stop.set()
        self._slots.release()  # wake the producer if it waits for a slot

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _produce(self) -> None:
        try:
            for item in self._chunks:
                if not self._wait_for_slot():
                    return
                self._put(item)
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _wait_for_slot(self) -> bool:
        while not self._slots.acquire(timeout=1.0):
            if self._stop.is_set() or self._loop.is_closed():
                return False
        return not self._stop.is_set()


class _InlineProducer:
    """`_Producer`'s interface for a small plan: each chunk made when asked, in the event
    loop."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks

    async def get(self) -> Chunk | None:
        try:
            return next(self._chunks, None)
        except TransferError:
            raise
        except Exception as e:
            raise TransferError(f"sender failed: {e!r}") from e

    def stop(self) -> None:
        """Nothing runs ahead."""


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
        digest: str = DEFAULT_DIGEST,
    ):
        if not 4096 <= chunk_size <= 64 << 20:
            raise ValueError(f"chunk_size out of range: {chunk_size}")
        self.plan = plan
        self.stats = TransferStats()
        self._framer = _Framer(plan, self.stats, compress, level, chunk_size, tamper, digest)
        self._bucket = _TokenBucket(rate_limit) if rate_limit is not None else None
        self._on_progress = on_progress
        self._used = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError("a TreeStream can be iterated only once")
        self._used = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        t0 = time.monotonic()
        wire = self._framer.wire()
        producer = _InlineProducer(wire) if self._small() else _Producer(wire)
        reported = 0
        try:
            while (chunk := await producer.get()) is not None:
                data, done = chunk
                for piece, progress in self._slices(data, done, reported):
                    if self._bucket is not None:
                        await self._bucket.take(len(piece))
                    yield piece
                    self.stats.wire_bytes += len(piece)
                    if progress is not None:
                        self._on_progress(progress)
                reported = done
        finally:
            producer.stop()
            self.stats.seconds = time.monotonic() - t0

    def _small(self) -> bool:
        plan = self.plan
        return (plan.total_bytes <= INLINE_MAX_BYTES
                and len(plan.entries) + len(plan.deleted) <= INLINE_MAX_ENTRIES)

    def _slices(self, data: bytes, done: int, reported: int) -> Iterator[tuple[bytes, int | None]]:
        """The pieces to send `data` in (50 ms each when rate limited), each with the
        progress to report after it (interpolated over the chunk), None for none."""
        report = self._on_progress is not None and done > reported
        if self._bucket is None:
            yield data, done if report else None
            return
        step = self._bucket.piece
        for off in range(0, len(data), step):
            piece = data[off : off + step]
            at = reported + (done - reported) * (off + len(piece)) // len(data)
            yield piece, at if report else None


send_tree = TreeStream  # send_tree(plan, compress=, digest=, ...) -> the stream
