"""The receiving side: parse a tree stream and apply it to a destination directory.

A stream cannot write outside the destination, and an aborted transfer leaves no partial
file under its real name (it may leave earlier complete entries); see `apply`. Any
malformed or inconsistent input raises `TransferError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from pathlib import Path

import zstandard

from godwit.transport.apply import TreeWriter
from godwit.transport.rules import KEEP_ALL, TreeRules
from godwit.transport.wire import (
    DIGEST_LEN,
    INLINE_MAX_BYTES,
    INLINE_MAX_ENTRIES,
    LENGTH_LEN,
    STREAM_HEADER_LEN,
    TransferError,
    TransferStats,
    check_end,
    decode_header,
    header_length,
    parse_stream_header,
)

_RECV_BATCH = 1 << 20  # bytes handed to the worker thread at a time
_RECV_INFLIGHT = 3  # batches queued for the worker thread


# What the parser reads next (plain ints: compared several times per record).
_MAGIC, _LENGTH, _HEADER, _DATA, _TRAILER, _DONE, _FAILED = range(7)


class _Sink:
    def __init__(self, fn: Callable[[bytes], None]):
        self.write = fn


class TreeReceiver:
    """Synchronous receiver core, no asyncio: `feed()` stream bytes in any pieces, then
    `finish()`. Blocking file I/O: run it in a worker thread (as `receive_tree` does).
    On error it raises `TransferError` and cleans up (see `abort`)."""

    def __init__(self, dest: Path | str, rules: TreeRules = KEEP_ALL):
        self.dest = Path(dest)
        self.stats = TransferStats()
        self._tree = TreeWriter(dest, self.stats, rules)
        self._state = _MAGIC
        self._need = STREAM_HEADER_LEN
        self._buf = bytearray()
        self._zw: zstandard.ZstdDecompressionWriter | None = None
        self._t0 = time.monotonic()

    @property
    def bytes_done(self) -> int:
        return self.stats.bytes

    def feed(self, data: bytes) -> None:
        if self._state == _FAILED:
            raise TransferError("receiver already failed")
        self.stats.wire_bytes += len(data)
        try:
            if self._zw is not None:
                self._zw.write(data)
            else:
                self._consume(data)
        except (TransferError, zstandard.ZstdError, OSError, ValueError) as e:
            self.abort()
            if isinstance(e, TransferError):
                raise
            raise _as_transfer_error(e, self._tree.where) from e

    def feed_many(self, pieces: Iterable[bytes]) -> None:
        for data in pieces:
            self.feed(data)

    def finish(self) -> TransferStats:
        """Check the stream was complete, apply directory metadata, return the stats."""
        if self._state != _DONE:
            cur = self._tree.incoming
            what = "inside file " + repr(cur.path) if cur else "before the end record"
            self.abort()
            raise TransferError(f"truncated stream: ended {what}")
        try:
            self._tree.finish()
        except OSError as e:
            self.abort()
            raise TransferError(f"{self._tree.where}: {e.strerror or e}") from e
        self._tree.close()
        self.stats.seconds = time.monotonic() - self._t0
        return self.stats

    def abort(self) -> None:
        """Drop the file being received (its temporary name) and close everything."""
        if self._state == _FAILED:
            return
        self._state = _FAILED
        self._tree.abort()

    # ---- parsing

    def _consume(self, data: bytes) -> None:
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            state = self._state
            if state == _DATA:
                pos = self._consume_data(mv, pos)
                continue
            if state == _DONE:
                raise TransferError("trailing data after the end record")
            field, pos = self._take_field(mv, pos)
            if field is None:
                return
            self._on_field(state, field)
            if state == _MAGIC and self._zw is not None:
                if pos < len(mv):
                    self._zw.write(mv[pos:])  # calls back with the decompressed bytes
                return

    def _take_field(self, mv: memoryview, pos: int) -> tuple[memoryview | None, int]:
        """The next `_need` bytes (None if they are not all here yet: kept for later)."""
        need = self._need
        if not self._buf and len(mv) - pos >= need:
            return mv[pos : pos + need], pos + need
        k = min(need - len(self._buf), len(mv) - pos)
        self._buf += mv[pos : pos + k]
        if len(self._buf) < need:
            return None, pos + k
        field = memoryview(bytes(self._buf))
        self._buf.clear()
        return field, pos + k

    def _consume_data(self, mv: memoryview, pos: int) -> int:
        cur = self._tree.incoming
        k = min(cur.remaining, len(mv) - pos)
        self._tree.write(mv[pos : pos + k])
        if cur.remaining == 0:
            self._state, self._need = _TRAILER, DIGEST_LEN
        return pos + k

    def _on_field(self, state: int, field: memoryview) -> None:
        if state == _MAGIC:
            self._start(bytes(field))
        elif state == _LENGTH:
            self._state, self._need = _HEADER, header_length(field)
        elif state == _HEADER:
            self._record(bytes(field))
        else:  # TRAILER
            self._tree.commit_file(bytes(field))
            self._state, self._need = _LENGTH, LENGTH_LEN

    def _start(self, head: bytes) -> None:
        stream = parse_stream_header(head)
        self._tree.digest = stream.digest
        if stream.compressed:
            self._zw = zstandard.ZstdDecompressor().stream_writer(
                _Sink(self._consume), write_size=_RECV_BATCH, closefd=False
            )
        self._state, self._need = _LENGTH, LENGTH_LEN

    def _record(self, raw: bytes) -> None:
        h = decode_header(raw)
        self._state, self._need = _LENGTH, LENGTH_LEN
        if h.get("type") == "end":
            check_end(h, self.stats)
            self._state = _DONE
            return
        incoming = self._tree.apply(h)
        if incoming is not None:
            self._state, self._need = _DATA if incoming.remaining else _TRAILER, DIGEST_LEN


def _as_transfer_error(e: Exception, where: str) -> TransferError:
    """What a failure while applying the stream means for the stream."""
    if isinstance(e, zstandard.ZstdError):
        return TransferError(f"corrupt zstd stream: {e}")
    if isinstance(e, OSError):
        return TransferError(f"{where + ': ' if where else ''}{e.strerror or e}")
    return TransferError(f"rejected path: {e}")  # ValueError: path validation


async def receive_tree(
    stream: AsyncIterable[bytes],
    dest: Path | str,
    *,
    on_progress: Callable[[int], None] | None = None,
    rules: TreeRules = KEEP_ALL,
) -> TransferStats:
    """Receive a tree stream (an aiohttp ``StreamReader`` such as ``request.content``, or
    any async iterable of bytes) into `dest`, created if needed. Parsing, hashing and file
    I/O run in one worker thread while the event loop reads the next piece, except for a
    small stream's (INLINE_MAX_BYTES, INLINE_MAX_ENTRIES): in the event loop.
    `on_progress(bytes_done)` is called on the event loop; `rules` bound what the tree may
    hold (`godwit.transport.rules`). Raises `TransferError`."""
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="godwit-recv")
    try:
        try:
            core = TreeReceiver(dest, rules)
        except OSError as e:
            raise TransferError(f"{dest}: {e.strerror or e}") from e
        feeder = _Feeder(loop, executor, core, on_progress)
        try:
            await feeder.pump(_chunks_of(stream))
            stats = await feeder.finish()
            if on_progress is not None:
                on_progress(stats.bytes)
            return stats
        except BaseException:
            feeder.abandon()
            raise
    finally:
        executor.shutdown(wait=False)


def _chunks_of(stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    return stream.iter_any() if hasattr(stream, "iter_any") else aiter(stream)


class _Feeder:
    """Hands the stream to the receiver's (FIFO) worker thread in batches, at most
    `_RECV_INFLIGHT` batches ahead of it; while the stream is still small, the receiver
    parses it at once in the event loop instead."""

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: concurrent.futures.Executor,
                 core: TreeReceiver, on_progress: Callable[[int], None] | None):
        self._loop, self._executor, self._core = loop, executor, core
        self._on_progress = on_progress
        self._pending: deque[asyncio.Future] = deque()
        self._threaded = False  # once a piece is left for the thread, all the rest is

    async def pump(self, chunks: AsyncIterator[bytes]) -> None:
        """Feed everything, then wait until the worker has parsed it."""
        batch: list[bytes] = []
        batched = 0
        try:
            async for data in chunks:
                if self._inline(data):
                    self._core.feed(data)
                    continue
                self._threaded = True  # what follows is parsed after this, in the thread
                batch.append(data)
                batched += len(data)
                if batched >= _RECV_BATCH:
                    await self._settle(_RECV_INFLIGHT - 1)
                    self._submit(batch)
                    batch, batched = [], 0
        except (TransferError, asyncio.CancelledError):
            raise
        except Exception as e:
            await self._settle(0)  # a parse error there is the better message
            raise TransferError(f"stream broken: {e!r}"[:300]) from e
        if batch:
            self._submit(batch)
        await self._settle(0)

    async def finish(self) -> TransferStats:
        """The receiver's end check and directory metadata, where it parsed."""
        if self._threaded:
            return await self._loop.run_in_executor(self._executor, self._core.finish)
        return self._core.finish()

    def _inline(self, data: bytes) -> bool:
        stats = self._core.stats
        return not self._threaded and (stats.wire_bytes + len(data) <= INLINE_MAX_BYTES
                                       and stats.entries < INLINE_MAX_ENTRIES)

    def abandon(self) -> None:
        """After a failure: drop the queued feeds, then abort the receiver."""
        for fut in self._pending:  # feeds after a failed one fail too: nobody needs to know
            if fut.done() and not fut.cancelled():
                fut.exception()
            else:
                fut.cancel()
        self._executor.submit(self._core.abort)  # after any feed still running in the worker

    def _submit(self, batch: list[bytes]) -> None:
        feed = self._loop.run_in_executor(self._executor, self._core.feed_many, batch)
        self._pending.append(feed)

    async def _settle(self, keep: int) -> None:
        while len(self._pending) > keep:
            await self._pending.popleft()
            if self._on_progress is not None:
                self._on_progress(self._core.bytes_done)
