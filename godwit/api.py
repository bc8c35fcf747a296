"""HTTP/JSON client of a godwit agent, used by the CLI and by agents talking to each other.

The routes and every body are in godwit.protocol (`ROUTES`, one Struct per body); an agent
serves the same as an OpenAPI 3.1 document at `GET /v1/openapi.json`. Errors are
`{"error": "one line"}` with a 4xx/5xx status. Replies are decoded into their types here,
so a peer's malformed answer is a GodwitError of one line, not a KeyError later.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import aiohttp

from godwit.errors import Conflict, GodwitError, NotFound
from godwit.image_config import Overrides
from godwit.migration import MigrationOptions
from godwit.network import ContainerNet
from godwit.preflight import Finding
from godwit.protocol import (
    PAGES_WAIT_S,
    Activated,
    AdoptRequest,
    Armed,
    ArmRequest,
    ClockSample,
    ContainerInfo,
    ErrorReply,
    Event,
    ExecRequest,
    ExecResult,
    Forgotten,
    HostInfo,
    IncomingRequest,
    IncomingState,
    MigrationLogs,
    PreflightReply,
    PreflightRequest,
    Prepared,
    Released,
    Removed,
    Report,
    Restored,
    RestoreRequest,
    RunRequest,
    Signalled,
    SignalRequest,
    Uploaded,
    decode,
    encode,
)

DEFAULT_PORT = 7451
QUICK = aiohttp.ClientTimeout(total=10)  # safety-net calls must not hang on a dead peer
PAGES_WAIT = aiohttp.ClientTimeout(total=PAGES_WAIT_S + 10)  # a long poll, then as QUICK
ABORT_TIMEOUT_S = 3.0  # a rollback's abort: the source may resume sooner (source.py)
JSON = {"Content-Type": "application/json"}
R = TypeVar("R")


class AgentUnreachable(GodwitError):
    """The agent could not be reached or the connection broke."""


def normalize_address(address: str) -> str:
    """'host' or 'host:port' -> 'host:port'."""
    if not address or address.startswith(":"):
        raise GodwitError(f"invalid agent address {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return f"{address}:{DEFAULT_PORT}"
    if not 0 < int(port) < 65536:
        raise GodwitError(f"invalid port in agent address {address!r}")
    return f"{host}:{port}"


class AgentClient:
    """One agent's API. Use as `async with AgentClient(addr, ssl_context) as agent:`."""

    def __init__(
        self, address: str, ssl_context: ssl.SSLContext | None = None, *, timeout: float = 30
    ) -> None:
        self.address = normalize_address(address)
        scheme = "https" if ssl_context else "http"
        self.base = f"{scheme}://{self.address}"
        self._ssl = ssl_context if ssl_context else False
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=32)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session:
            await self._session.close()

    async def request(self, method: str, path: str, reply: type[R] = Any,  # type: ignore[assignment]
                      body: object = None, **kwargs: Any) -> R:
        """One request (`body`: a protocol message); the reply decoded as `reply`. Raises
        a GodwitError subclass on any failure."""
        assert self._session, "use AgentClient as an async context manager"
        if body is not None:
            kwargs.update(data=encode(body), headers=JSON)
        try:
            async with self._session.request(method, self.base + path, **kwargs) as resp:
                return await self._reply(resp, reply)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnreachable(f"agent {self.address}: {self._explain(exc)}") from exc

    async def _reply(self, resp: aiohttp.ClientResponse, reply: type[R]) -> R:
        data = await resp.read()
        if resp.status < 400:
            return decode(data, reply, f"reply of agent {self.address}")
        try:
            message = decode(data, ErrorReply).error
        except GodwitError:
            message = f"HTTP {resp.status} {resp.reason}"
        if resp.status == 404:
            raise NotFound(message)
        if resp.status == 409:
            raise Conflict(message)
        raise GodwitError(message)

    def _explain(self, exc: BaseException) -> str:
        """asyncio sends no TLS alert, so a refused handshake looks like a hang-up."""
        text = _describe(exc)
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            text += (" (the agent may have refused our certificate: revoked, expired or of "
                     "another CA)" if self._ssl else
                     " (the agent probably requires TLS: see `godwit use-tls`)")
        return text

    async def stream_events(self, path: str, body: object) -> AsyncIterator[Event]:
        """POST and yield the NDJSON events of the response."""
        assert self._session
        try:
            async with self._session.post(
                self.base + path, data=encode(body), headers=JSON,
                timeout=aiohttp.ClientTimeout(total=None)
            ) as resp:
                if resp.status >= 400:
                    await self._reply(resp, ErrorReply)
                async for line in resp.content:
                    if line.strip():
                        yield decode(line, Event, f"event from agent {self.address}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnreachable(f"agent {self.address}: {self._explain(exc)}") from exc

    # host and containers
    async def info(self) -> HostInfo:
        return await self.request("GET", "/v1/info", HostInfo)

    async def openapi(self) -> dict:
        return await self.request("GET", "/v1/openapi.json", dict)

    async def containers(self) -> list[ContainerInfo]:
        return await self.request("GET", "/v1/containers", list[ContainerInfo])

    async def container(self, name: str) -> ContainerInfo:
        return await self.request("GET", f"/v1/containers/{name}", ContainerInfo)

    async def run(self, name: str, bundle: str, net: ContainerNet | None = None
                  ) -> ContainerInfo:
        body = RunRequest(name=name, bundle=bundle, net=net)
        return await self.request("POST", "/v1/containers", ContainerInfo, body)

    async def run_image(self, name: str, image: str, overrides: Overrides | None = None,
                        net: ContainerNet | None = None) -> ContainerInfo:
        body = RunRequest(name=name, image=image, overrides=overrides, net=net)
        return await self.request("POST", "/v1/containers", ContainerInfo, body)

    async def remove(self, name: str) -> Removed:
        return await self.request("DELETE", f"/v1/containers/{name}", Removed)

    async def exec(self, name: str, argv: list[str]) -> ExecResult:
        return await self.request("POST", f"/v1/containers/{name}/exec", ExecResult,
                                  ExecRequest(argv=argv))

    async def signal(self, name: str, signal: str) -> Signalled:
        return await self.request("POST", f"/v1/containers/{name}/signal", Signalled,
                                  SignalRequest(signal=signal))

    async def resume(self, name: str) -> ContainerInfo:
        return await self.request("POST", f"/v1/containers/{name}/resume", ContainerInfo)

    async def adopt(self, name: str, runc_root: str | None, runc_id: str | None,
                    ) -> ContainerInfo:
        return await self.request("POST", f"/v1/containers/{name}/adopt", ContainerInfo,
                                  AdoptRequest(runc_root=runc_root, id=runc_id))

    async def release(self, name: str, runc_root: str | None, runc_id: str | None,
                      ) -> Released:
        return await self.request("POST", f"/v1/containers/{name}/release", Released,
                                  AdoptRequest(runc_root=runc_root, id=runc_id))

    def migrate(self, name: str, options: MigrationOptions) -> AsyncIterator[Event]:
        return self.stream_events(f"/v1/containers/{name}/migrate", options)

    # pre-flight and history
    async def time_pair(self) -> tuple[float, float]:
        """(receive, send) times of the agent's clock for one request."""
        stamps = await self.request("GET", "/v1/time", ClockSample)
        return stamps.received, stamps.sent

    async def check_cpuinfo(self, image: bytes) -> Finding:
        return await self.request("POST", "/v1/preflight/cpuinfo", Finding, data=image)

    async def check_admission(self, request: IncomingRequest) -> Finding:
        return await self.request("POST", "/v1/preflight/admission", Finding, request)

    async def preflight(self, body: PreflightRequest) -> PreflightReply:
        return await self.request("POST", "/v1/preflight", PreflightReply, body)

    async def history(self) -> list[Report]:
        return await self.request("GET", "/v1/migrations", list[Report])

    async def report(self, migration_id: str) -> Report:
        return await self.request("GET", f"/v1/migrations/{migration_id}", Report)

    async def migration_logs(self, migration_id: str) -> MigrationLogs:
        return await self.request("GET", f"/v1/migrations/{migration_id}/logs", MigrationLogs)

    # destination side of a migration
    async def prepare_incoming(self, request: IncomingRequest) -> Prepared:
        return await self.request("POST", "/v1/incoming", Prepared, request)

    async def upload(self, migration_id: str, what: str, body: AsyncIterator[bytes]
                     ) -> Uploaded:
        return await self.request("PUT", f"/v1/incoming/{migration_id}/{what}", Uploaded,
                                  data=body)

    async def arm_incoming(self, migration_id: str, descriptors: list[str],
                           stream_pages: bool = False, fill_after_restore: bool = False,
                           lazy_page_server: str | None = None,
                           images_in_memory: bool = False) -> Armed:
        return await self.request("POST", f"/v1/incoming/{migration_id}/arm", Armed,
                                  ArmRequest(descriptors=descriptors, stream_pages=stream_pages,
                                             fill_after_restore=fill_after_restore,
                                             lazy_page_server=lazy_page_server,
                                             images_in_memory=images_in_memory))

    async def activate_incoming(self, migration_id: str) -> Activated:
        return await self.request("POST", f"/v1/incoming/{migration_id}/activate", Activated,
                                  timeout=QUICK)

    async def restore_incoming(self, migration_id: str, body: RestoreRequest) -> Restored:
        return await self.request("POST", f"/v1/incoming/{migration_id}/restore", Restored,
                                  body)

    async def restore_with_images(self, migration_id: str, images: AsyncIterator[bytes]
                                  ) -> Restored:
        return await self.request("POST", f"/v1/incoming/{migration_id}/restore-images",
                                  Restored, data=images)

    async def commit_incoming(self, migration_id: str) -> IncomingState:
        return await self.request("POST", f"/v1/incoming/{migration_id}/commit",
                                  IncomingState, timeout=QUICK)

    async def forget_incoming(self, migration_id: str) -> Forgotten:
        return await self.request("POST", f"/v1/incoming/{migration_id}/forget", Forgotten,
                                  timeout=QUICK)

    async def incoming_state(self, migration_id: str) -> IncomingState:
        return await self.request("GET", f"/v1/incoming/{migration_id}", IncomingState,
                                  timeout=QUICK)

    async def incoming_pages(self, migration_id: str) -> IncomingState:
        """The state once the restored memory is complete or failed (or PAGES_WAIT_S on)."""
        return await self.request("GET", f"/v1/incoming/{migration_id}/pages", IncomingState,
                                  timeout=PAGES_WAIT)

    async def abort_incoming(self, migration_id: str) -> IncomingState:
        return await self.request("DELETE", f"/v1/incoming/{migration_id}", IncomingState,
                                  timeout=aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
