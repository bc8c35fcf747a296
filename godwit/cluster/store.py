"""The connection to the cluster's etcd v3, with godwit's TLS files.

The client library is etcd3aio (pinned in pyproject.toml). The three options compared:

- aetcd 1.0.0 (June 2026, Python 3.10-3.14, grpcio/protobuf ranges that fit this machine):
  its channel is always ``grpc.aio.insecure_channel``; there is no way to give it a CA or a
  client certificate. godwit speaks mutual TLS on every connection, so it is out.
- etcd's own v3 JSON gateway through aiohttp (no new dependency): it works with etcd 3.4's
  ``/v3/*`` paths and an ``ssl.SSLContext``, but godwit would hand-write the client: base64
  of every key and value, the txn JSON, lease keepalive, chunked watch streams, endpoint
  failover and retries. That is what a client library is for.
- etcd3aio 0.3.0 (March 2026, Python 3.11+, grpcio>=1.67, protobuf>=5.26; here grpcio
  1.85.3 and protobuf 7.36.2): grpc.aio, mutual TLS (CA, key, chain), several endpoints with
  round-robin failover, bounded retries of transient errors, typed protobuf replies, leases
  with keepalive, transactions (compare-and-swap), watches that reconnect. It is young
  (one maintainer) and tested upstream on etcd 3.5/3.6; godwit's tests run it against
  Debian's 3.4.23, whose gRPC API has everything used here. It puts its generated protobuf
  packages (``etcd``, ``google.api``) on ``sys.path``, so it cannot be imported beside
  another etcd protobuf package (aetcd's, for one) in the same process.

Every call here has a deadline; an unreachable, stopped or frozen etcd ends in
`ClusterUnavailable` with one line, never a hang. Reads and idempotent writes are retried
within the deadline: a member that dies leaves in-flight requests waiting for the next
leader, which the next attempt reaches (so transactions are written to be idempotent).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core logs each failed handshake
# The agent forks (pyroute2 creates network namespaces in a forked child): with gRPC's fork
# support on, the child runs gRPC's fork handler and aborts at times ("Check failed:
# next_worker->state == KICKED" in ev_epoll1_linux.cc), so `godwit run` failed with "child
# process is dead, status: -6" in about one run of six. The children never use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc
from etcd3aio import Etcd3Client, EtcdError
from etcd3aio.kv import KVService, prefix_range_end

from godwit.errors import GodwitError
from godwit.tls import TLSFiles

DEFAULT_PREFIX = "godwit/"
# Every etcd member's certificate carries this DNS name beside its own address, and the
# client checks it: one gRPC channel balances over all members, so it verifies them all
# against one name (`godwit ca issue etcd1 --san 10.0.0.1 --san etcd.godwit`).
SERVER_NAME = "etcd.godwit"
DEFAULT_TIMEOUT_S = 5.0
ATTEMPT_TIMEOUT_S = 2.0
RETRY_PAUSE_S = 0.2

T = TypeVar("T")


class ClusterUnavailable(GodwitError):
    """etcd did not answer within the deadline (down, frozen, unreachable, no quorum)."""


class OutcomeUnknown(ClusterUnavailable):
    """A transaction was sent but no answer came back: it may or may not have applied."""


@dataclass(frozen=True)
class Entry:
    """One key as read: its JSON value, revisions and lease (0: none)."""

    key: str
    value: dict[str, Any]
    create_revision: int
    mod_revision: int
    lease: int


def parse_endpoints(urls: str) -> list[str]:
    """`https://10.0.0.1:2379,https://10.0.0.2:2379` → `["10.0.0.1:2379", ...]`.

    Raises GodwitError (one line) for anything but https URLs with an IPv4 host and a port
    (the client dials addresses, and godwit speaks TLS only).
    """
    endpoints = []
    for url in filter(None, (u.strip() for u in urls.split(","))):
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "https" or not parts.hostname or not port:
            raise GodwitError(f"bad etcd URL {url!r}: expected https://ADDRESS:PORT")
        endpoints.append(f"{parts.hostname}:{port}")
    if not endpoints:
        raise GodwitError("no etcd URL given")
    return endpoints


def encode(value: dict[str, Any]) -> bytes:
    """The canonical JSON of a value (so a transaction can compare values byte for byte)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class Store:
    """`async with Store(urls, tls) as store:` — keys are relative to `prefix`."""

    def __init__(self, urls: str, tls: TLSFiles, *, prefix: str = DEFAULT_PREFIX,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.urls = urls
        self.endpoints = parse_endpoints(urls)
        self.tls = tls
        self.prefix = prefix
        self.timeout = timeout
        self.round_trips = 0  # requests sent (attempts included): the control plane's cost
        self._client: Etcd3Client | None = None

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel and read once: ClusterUnavailable if etcd does not answer."""
        try:
            client = Etcd3Client(
                self.endpoints, ca_cert=self.tls.ca.read_bytes(),
                cert_key=self.tls.key.read_bytes(), cert_chain=self.tls.cert.read_bytes(),
                tls_server_name=SERVER_NAME, rpc_max_attempts=1)
        except OSError as e:
            raise GodwitError(f"cannot read TLS files for etcd: {e}") from e
        await client.connect()
        self._client = client
        await self.revision()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> Etcd3Client:
        if self._client is None:
            raise GodwitError("not connected to etcd")
        return self._client

    def key(self, relative: str) -> bytes:
        return (self.prefix + relative).encode()

    async def revision(self) -> int:
        """The cluster's current revision (a cheap read)."""
        reply = await self._retried("read", lambda t: self.client.kv.get(
            self.key(""), count_only=True, timeout=t))
        return reply.header.revision

    async def get(self, relative: str) -> Entry | None:
        reply = await self._retried("read", lambda t: self.client.kv.get(
            self.key(relative), timeout=t))
        return self._entry(reply.kvs[0]) if reply.kvs else None

    async def list(self, relative_prefix: str) -> list[Entry]:
        """Every key under the prefix, in key order."""
        start = self.key(relative_prefix)
        reply = await self._retried("read", lambda t: self.client.kv.get(
            start, range_end=prefix_range_end(start), timeout=t))
        return [self._entry(kv) for kv in reply.kvs]

    async def put(self, relative: str, value: dict[str, Any], *, lease: int = 0) -> int:
        """Write a key (idempotent, so retried); returns the new revision."""
        data = encode(value)
        reply = await self._retried("write", lambda t: self.client.kv.put(
            self.key(relative), data, lease=lease, timeout=t))
        return reply.header.revision

    async def delete(self, relative: str) -> bool:
        reply = await self._retried("delete", lambda t: self.client.kv.delete(
            self.key(relative), timeout=t))
        return reply.deleted > 0

    async def txn(self, compare: list, success: list, failure: list = ()) -> Any:
        """One transaction, retried within the deadline like every call: an attempt whose
        answer was lost (a leader killed mid-request) may have applied, so write each
        transaction to be idempotent (its compare sees its own earlier success). At the
        deadline, OutcomeUnknown: read the keys once etcd answers to learn the outcome."""
        return await self._retried("transaction", lambda t: self.client.kv.txn(
            compare, success, list(failure), timeout=t), unknown_outcome=True)

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id."""
        reply = await self._retried("lease grant", lambda t: self.client.lease.grant(
            ttl, timeout=t))
        return reply.ID

    async def refresh(self, lease: int) -> int:
        """Keep a lease alive once; returns its remaining TTL (0 or less: it is gone)."""

        async def once(timeout: float) -> int:
            call = self.client.lease.keep_alive(lease)
            try:
                async with asyncio.timeout(timeout):
                    async for reply in call:
                        return reply.TTL
            finally:
                call.cancel()
            return 0

        return await self._retried("lease keepalive", once)

    async def revoke(self, lease: int) -> None:
        """Revoke a lease: every key attached to it goes (a lease already gone is fine)."""

        async def once(timeout: float) -> None:
            try:
                await self.client.lease.revoke(lease, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._retried("lease revoke", once)

    async def watch(self, relative_prefix: str) -> AsyncIterator[None]:
        """Yields once per batch of changes under the prefix, for as long as it is iterated
        (the client reconnects to another member on its own). Callers re-read what they need:
        a wake-up, not a change log, so a missed batch costs nothing but a later re-read."""
        start = self.key(relative_prefix)
        async for reply in self.client.watch.watch(start, range_end=prefix_range_end(start)):
            if reply.events:
                yield None

    # transaction building blocks, on relative keys
    def same_value(self, relative: str, value: dict[str, Any]) -> Any:
        return KVService.txn_compare_value(self.key(relative), encode(value))

    def absent(self, relative: str) -> Any:
        return KVService.txn_compare_create_revision(self.key(relative), 0)

    def op_put(self, relative: str, value: dict[str, Any], *, lease: int = 0) -> Any:
        return KVService.txn_op_put(self.key(relative), encode(value), lease=lease)

    def op_get(self, relative: str) -> Any:
        return KVService.txn_op_get(self.key(relative))

    def op_delete(self, relative: str) -> Any:
        return KVService.txn_op_delete(self.key(relative))

    def entry_of(self, range_reply: Any) -> Entry | None:
        """The entry of a transaction's get (`op_get`), None if the key is absent."""
        kvs = range_reply.response_range.kvs
        return self._entry(kvs[0]) if kvs else None

    def _entry(self, kv: Any) -> Entry:
        return Entry(kv.key.decode()[len(self.prefix):], json.loads(kv.value),
                     kv.create_revision, kv.mod_revision, kv.lease)

    async def _retried(self, what: str, call: Callable[[float], Awaitable[T]], *,
                       unknown_outcome: bool = False) -> T:
        """`call(attempt_timeout)` until it answers or the deadline passes."""
        started = time.monotonic()
        deadline = started + self.timeout
        while True:
            remaining = deadline - time.monotonic()
            self.round_trips += 1
            try:
                return await call(min(ATTEMPT_TIMEOUT_S, remaining))
            except (TimeoutError, EtcdError, grpc.aio.AioRpcError) as e:
                if isinstance(e, grpc.aio.AioRpcError) and e.code() not in _TRANSIENT:
                    raise GodwitError(f"etcd refused the {what}: {_first_line(e.details())}") \
                        from e
                if time.monotonic() + RETRY_PAUSE_S >= deadline:
                    error = OutcomeUnknown if unknown_outcome else ClusterUnavailable
                    raise error(self._unavailable(what, e, started)) from e
                await asyncio.sleep(RETRY_PAUSE_S)

    def _unavailable(self, what: str, error: BaseException, started: float) -> str:
        reason = _reason(error)
        return (f"etcd at {self.urls} is unavailable ({what} failed after "
                f"{time.monotonic() - started:.1f} s: {reason})")


_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED)


def _reason(error: BaseException) -> str:
    """The gist of a failed call: gRPC's last error if it names one, else its first line."""
    if isinstance(error, TimeoutError):
        return "no answer"
    text = _first_line(str(error))
    if "last error: " in text:
        text = text.split("last error: ", 1)[1].rstrip(")")
    return text or type(error).__name__


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""
