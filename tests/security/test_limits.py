"""The listener's limits over real TLS on loopback: idle sockets that never say hello are
pushed out or cut, and an authenticated client still gets through."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from godwit.limits import ConnectionGate, GatedSite, Limits, listen
from godwit.pki import CertificateAuthority
from godwit.tls import client_context, server_context


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority(tmp_path / "ca")
    authority.init()
    authority.issue("h1", "agent", ["127.0.0.1"])
    authority.issue("op", "operator", [])
    return authority


async def serving(ca: CertificateAuthority, limits: Limits) -> tuple[GatedSite, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=(await request.read()).decode() or "hello")

    gate = ConnectionGate(limits)
    app = web.Application(middlewares=[gate.middleware])
    app.add_routes([web.get("/", hello), web.post("/", hello)])
    runner = web.AppRunner(app)
    await runner.setup()
    sock = listen("127.0.0.1", 0, gate)
    site = GatedSite(runner, sock, ssl_context=server_context(ca.bundle_for("h1")))
    await site.start()
    return site, sock.getsockname()[1]


async def idle_sockets(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections that never start a TLS handshake."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
        if len(socks) % 50 == 0:
            await asyncio.sleep(0.01)  # let the agent accept them
    await asyncio.sleep(0.5)
    return socks


async def operator_connection(ca: CertificateAuthority, port: int
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port,
                                         ssl=client_context(ca.bundle_for("op")),
                                         server_hostname="127.0.0.1")


async def get(ca: CertificateAuthority, port: int, data: str | None = None) -> str:
    async with aiohttp.ClientSession() as session, session.request(
            "POST" if data else "GET", f"https://127.0.0.1:{port}/", data=data,
            ssl=client_context(ca.bundle_for("op")),
            timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.text()


def test_idle_unauthenticated_sockets_do_not_keep_a_client_out(
        ca: CertificateAuthority) -> None:
    async def go() -> None:
        site, port = await serving(ca, Limits(max_pending=64))
        socks = await idle_sockets(port, 600)
        try:
            assert await get(ca, port) == "hello"
            assert site.gate.evicted >= 600 - 64 - 128  # the backlog may hold the rest
            assert len(site.gate.pending()) <= 64
        finally:
            for s in socks:
                s.close()
            await site.stop()

    asyncio.run(go())


def test_a_handshake_never_made_is_cut(ca: CertificateAuthority) -> None:
    async def go() -> None:
        site, port = await serving(ca, Limits(handshake_timeout=1.0))
        socks = await idle_sockets(port, 5)
        try:
            await asyncio.sleep(3)
            for s in socks:
                s.setblocking(True)
                s.settimeout(1)
                assert s.recv(1) == b"", "the server must have closed it"
            assert not site.gate.connections
        finally:
            for s in socks:
                s.close()
            await site.stop()

    asyncio.run(go())


def test_a_request_head_never_sent_is_cut(ca: CertificateAuthority) -> None:
    async def go() -> None:
        site, port = await serving(ca, Limits(header_timeout=1.0))
        try:
            reader, writer = await operator_connection(ca, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert await get(ca, port, "body") == "body"
        finally:
            await site.stop()

    asyncio.run(go())


def test_a_stalled_body_is_cut(ca: CertificateAuthority) -> None:
    async def go() -> None:
        site, port = await serving(ca, Limits(body_timeout=1.0))
        try:
            reader, writer = await operator_connection(ca, port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            assert b"200" not in answer.split(b"\r\n")[0]
            writer.close()
        finally:
            await site.stop()

    asyncio.run(go())
