"""HTTP/JSON client of a godwit agent, used by the CLI and by agents talking to each other.

The protocol (all JSON unless noted, errors are `{"error": "one line"}` with 4xx/5xx):

    GET    /v1/info                          host facts: versions, CRIU features, time, resources
    GET    /v1/containers                    containers of this host
    POST   /v1/containers                    {"name", "bundle", "net"?}: start from a bundle dir,
                                             or {"name", "image", "overrides"?, "net"?} from
                                             an image (godwit.images; overrides: "env",
                                             "user", "workdir", "args")
    GET    /v1/containers/{name}             one container
    DELETE /v1/containers/{name}             kill and remove
    POST   /v1/containers/{name}/exec        {"argv"} -> {"exit_code", "stdout", "stderr"}
    POST   /v1/containers/{name}/signal      {"signal"}
    POST   /v1/containers/{name}/resume      resume a paused copy (after an in-doubt migration)
    POST   /v1/containers/{name}/migrate     {"to", "strategy", ...} -> NDJSON event stream
    GET    /v1/time                          {"received", "sent"}: clock samples for skew checks
    POST   /v1/preflight                     {"to", "strategy", "container"?} -> {"findings"}
    POST   /v1/preflight/cpuinfo             body: a `criu cpuinfo dump` image -> a finding
    GET    /v1/migrations                    reports of past migrations (history)
    GET    /v1/migrations/{id}               one report
    GET    /v1/migrations/{id}/logs          {"host", "logs": [{"name", "size", "text"}]}: the
                                             CRIU/runc logs this host kept of a failed
                                             migration, as source or destination ([]: none)
  destination side of a migration (agent to agent):
    POST   /v1/incoming                      {"id", "name", "config", "shared_rootfs", "net",
                                             "commit_timeout", ...}: prepare
    PUT    /v1/incoming/{id}/rootfs          body: godwit tree stream (see transport.py)
    PUT    /v1/incoming/{id}/images          body: godwit tree stream (also pre-1 … pre-9)
    POST   /v1/incoming/{id}/arm             {"descriptors"}: place rootfs and bundle, start
                                             runc restore held before CRIU (before the freeze)
    POST   /v1/incoming/{id}/activate        source frozen: take over the container's address
    POST   /v1/incoming/{id}/restore         {"page_server"?} -> {"restored_at", "pid", ...}
    POST   /v1/incoming/{id}/commit          the destination keeps the container
    POST   /v1/incoming/{id}/forget          the source settled it: drop the ended record
    GET    /v1/incoming/{id}                 {"state", "pages"?}
    DELETE /v1/incoming/{id}                 abort: kill a restored copy, drop staged files
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from godwit.errors import Conflict, GodwitError, NotFound

DEFAULT_PORT = 7451
QUICK = aiohttp.ClientTimeout(total=10)  # safety-net calls must not hang on a dead peer
ABORT_TIMEOUT_S = 3.0  # a rollback's abort: the source may resume sooner (source.py)


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

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One JSON request; raises a GodwitError subclass on any failure."""
        assert self._session, "use AgentClient as an async context manager"
        try:
            async with self._session.request(method, self.base + path, **kwargs) as resp:
                return await _json_or_raise(resp)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnreachable(f"agent {self.address}: {self._explain(exc)}") from exc

    def _explain(self, exc: BaseException) -> str:
        """asyncio sends no TLS alert, so a refused handshake looks like a hang-up."""
        text = _describe(exc)
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            text += (" (the agent may have refused our certificate: revoked, expired or of "
                     "another CA)" if self._ssl else
                     " (the agent probably requires TLS: see `godwit use-tls`)")
        return text

    async def stream_events(self, path: str, body: dict) -> AsyncIterator[dict]:
        """POST and yield the NDJSON events of the response."""
        assert self._session
        try:
            async with self._session.post(
                self.base + path, json=body, timeout=aiohttp.ClientTimeout(total=None)
            ) as resp:
                if resp.status >= 400:
                    await _json_or_raise(resp)
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AgentUnreachable(f"agent {self.address}: {self._explain(exc)}") from exc

    # containers
    async def info(self) -> dict:
        return await self.request("GET", "/v1/info")

    async def containers(self) -> list[dict]:
        return await self.request("GET", "/v1/containers")

    async def container(self, name: str) -> dict:
        return await self.request("GET", f"/v1/containers/{name}")

    async def run(self, name: str, bundle: str, net: dict | None = None) -> dict:
        body = {"name": name, "bundle": bundle, "net": net}
        return await self.request("POST", "/v1/containers", json=body)

    async def run_image(self, name: str, image: str, overrides: dict | None = None,
                        net: dict | None = None) -> dict:
        body = {"name": name, "image": image, "overrides": overrides, "net": net}
        return await self.request("POST", "/v1/containers", json=body)

    async def remove(self, name: str) -> dict:
        return await self.request("DELETE", f"/v1/containers/{name}")

    async def exec(self, name: str, argv: list[str]) -> dict:
        return await self.request("POST", f"/v1/containers/{name}/exec", json={"argv": argv})

    async def signal(self, name: str, signal: str) -> dict:
        body = {"signal": signal}
        return await self.request("POST", f"/v1/containers/{name}/signal", json=body)

    async def resume(self, name: str) -> dict:
        return await self.request("POST", f"/v1/containers/{name}/resume")

    def migrate(self, name: str, options: dict) -> AsyncIterator[dict]:
        return self.stream_events(f"/v1/containers/{name}/migrate", options)

    async def time_pair(self) -> tuple[float, float]:
        """(receive, send) times of the agent's clock for one request."""
        stamps = await self.request("GET", "/v1/time")
        return stamps["received"], stamps["sent"]

    async def check_cpuinfo(self, image: bytes) -> dict:
        return await self.request("POST", "/v1/preflight/cpuinfo", data=image)

    async def preflight(self, body: dict) -> dict:
        return await self.request("POST", "/v1/preflight", json=body)

    async def history(self) -> list[dict]:
        return await self.request("GET", "/v1/migrations")

    async def report(self, migration_id: str) -> dict:
        return await self.request("GET", f"/v1/migrations/{migration_id}")

    async def migration_logs(self, migration_id: str) -> dict:
        return await self.request("GET", f"/v1/migrations/{migration_id}/logs")

    # destination side of a migration
    async def prepare_incoming(self, request: dict) -> dict:
        return await self.request("POST", "/v1/incoming", json=request)

    async def upload(self, migration_id: str, what: str, body: AsyncIterator[bytes]) -> dict:
        return await self.request("PUT", f"/v1/incoming/{migration_id}/{what}", data=body)

    async def arm_incoming(self, migration_id: str, descriptors: list[str]) -> dict:
        return await self.request("POST", f"/v1/incoming/{migration_id}/arm",
                                  json={"descriptors": descriptors})

    async def activate_incoming(self, migration_id: str) -> dict:
        return await self.request("POST", f"/v1/incoming/{migration_id}/activate",
                                  timeout=QUICK)

    async def restore_incoming(self, migration_id: str, body: dict | None = None) -> dict:
        return await self.request("POST", f"/v1/incoming/{migration_id}/restore",
                                  json=body or {})

    async def commit_incoming(self, migration_id: str) -> dict:
        return await self.request("POST", f"/v1/incoming/{migration_id}/commit",
                                  timeout=QUICK)

    async def forget_incoming(self, migration_id: str) -> dict:
        return await self.request("POST", f"/v1/incoming/{migration_id}/forget",
                                  timeout=QUICK)

    async def incoming_state(self, migration_id: str) -> dict:
        return await self.request("GET", f"/v1/incoming/{migration_id}", timeout=QUICK)

    async def abort_incoming(self, migration_id: str) -> dict:
        return await self.request("DELETE", f"/v1/incoming/{migration_id}",
                                  timeout=aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S))


async def _json_or_raise(resp: aiohttp.ClientResponse) -> Any:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        data = None
    if resp.status < 400:
        return data
    message = data.get("error") if isinstance(data, dict) else None
    message = message or f"HTTP {resp.status} {resp.reason}"
    if resp.status == 404:
        raise NotFound(message)
    if resp.status == 409:
        raise Conflict(message)
    raise GodwitError(message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
