"""Mutual TLS: real handshakes against a real aiohttp server on 127.0.0.1.

A refusal by the server reaches an aiohttp client only as a disconnection: with TLS 1.3 the
client finishes its handshake before the server checks its certificate, and asyncio does not
send the fatal alert (CPython gh-98078). So each refusal test also asserts the exact reason on
the server side, from the handshake error asyncio logs in debug mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from godwit.pki import CertificateAuthority, PKIError
from godwit.tls import TLSFiles, client_context, peer_identity, server_context

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
SERVER_REFUSED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class Server(logging.Handler):
    """An aiohttp app in a background event loop; each `serve` adds a TLS listener.

    Records the peer of every request served and every failed server-side handshake.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []  # peer identities of the requests served
        self.refused: queue.Queue[ssl.SSLError] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)  # asyncio logs failed handshakes only in debug mode
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.asyncio_logger = logging.getLogger("asyncio")
        self.asyncio_level = self.asyncio_logger.level
        self.asyncio_logger.setLevel(logging.DEBUG)
        self.asyncio_logger.addHandler(self)
        app = web.Application()
        app.router.add_get("/", self._hello)
        self.runner = web.AppRunner(app)
        self._call(self.runner.setup())

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if record.thread == self.thread.ident and isinstance(exc, ssl.SSLError):
            self.refused.put(exc)

    async def _hello(self, request: web.Request) -> web.Response:
        name = peer_identity(request)
        self.seen.append(name)
        return web.Response(text=name)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def serve(self, files: TLSFiles) -> int:
        """Listen on a random port of 127.0.0.1 with ``server_context(files)``."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self.runner, sock, ssl_context=server_context(files))
        self._call(site.start())
        return sock.getsockname()[1]

    def close(self) -> None:
        self.asyncio_logger.removeHandler(self)
        self.asyncio_logger.setLevel(self.asyncio_level)
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    ca = CertificateAuthority(tmp_path_factory.mktemp("pki") / "ca")
    ca.init()
    ca.issue_agent("server", ["localhost", "127.0.0.1"])
    ca.issue_agent("elsewhere", ["agent-b.test", "10.1.2.3"])
    ca.issue_client("alice")
    return ca


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def port(pki: CertificateAuthority, server: Server) -> int:
    return server.serve(pki.bundle_for("server"))


def get(ctx: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> str:
    """GET / over HTTPS with aiohttp; returns the peer name the server saw."""

    async def go() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://{host}:{port}/", ssl=ctx) as resp,
        ):
            resp.raise_for_status()
            return await resp.text()

    return asyncio.run(go())


def assert_refused(ctx: ssl.SSLContext, port: int, server: Server) -> ssl.SSLError:
    """Assert the server refuses ``ctx``'s handshake; return the server-side error."""
    while not server.refused.empty():
        server.refused.get_nowait()
    before = list(server.seen)
    with pytest.raises(SERVER_REFUSED):
        get(ctx, port)
    assert server.seen == before, "the server handled a request from a refused peer"
    return server.refused.get(timeout=5)


def why(err: ssl.SSLError) -> str:
    """The verification failure of a certificate error, else the OpenSSL reason."""
    return getattr(err, "verify_message", None) or err.reason


def files_with(pki: CertificateAuthority, cert: Path, key: Path) -> TLSFiles:
    return TLSFiles(ca=pki.ca_cert, cert=cert, key=key, crl=pki.crl)


# -- accepted --------------------------------------------------------------------------


def test_valid_client_accepted(pki: CertificateAuthority, server: Server, port: int) -> None:
    ctx = client_context(pki.bundle_for("alice"))
    assert get(ctx, port) == "alice"
    assert get(ctx, port, host="localhost") == "alice"
    assert server.seen[-2:] == ["alice", "alice"]


def test_agent_cert_is_also_a_client_cert(pki: CertificateAuthority, port: int) -> None:
    assert get(client_context(pki.bundle_for("elsewhere")), port) == "elsewhere"


def test_renew_gives_a_working_cert(
    pki: CertificateAuthority, port: int, server: Server, tmp_path: Path
) -> None:
    first = pki.issue_client("renewme")
    old = pki.bundle_for("renewme")
    old_cert, old_key = tmp_path / "old.crt", tmp_path / "old.key"
    shutil.copy(old.cert, old_cert)
    shutil.copy(old.key, old_key)
    second = pki.renew("renewme", days=30)
    assert (second.name, second.role) == ("renewme", "operator") and second.serial != first.serial
    assert old.key.read_bytes() != old_key.read_bytes()  # a new key, too
    assert get(client_context(pki.bundle_for("renewme")), port) == "renewme"
    old_ctx = client_context(files_with(pki, old_cert, old_key))
    assert get(old_ctx, port) == "renewme"  # the old one stays valid until revoked...
    pki.revoke(first.serial)
    assert why(assert_refused(old_ctx, port, server)) == "certificate revoked"  # ...like this
    assert get(client_context(pki.bundle_for("renewme")), port) == "renewme"


# -- refused by the server -------------------------------------------------------------


def test_no_client_cert_refused(pki: CertificateAuthority, server: Server, port: int) -> None:
    ctx = ssl.create_default_context(cafile=pki.ca_cert)
    assert why(assert_refused(ctx, port, server)) == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_cert_from_another_ca_refused(
    pki: CertificateAuthority, server: Server, port: int, tmp_path: Path
) -> None:
    other = CertificateAuthority(tmp_path / "other")
    other.init()
    other.issue_client("alice")  # same name, wrong CA
    impostor = other.bundle_for("alice")
    ctx = client_context(files_with(pki, impostor.cert, impostor.key))
    assert why(assert_refused(ctx, port, server)) == "unable to get local issuer certificate"


def test_expired_cert_refused(pki: CertificateAuthority, server: Server, port: int) -> None:
    now = datetime.now(UTC)
    pki._issue("expired", "client", [], now - timedelta(days=10), now - timedelta(days=1))
    ctx = client_context(pki.bundle_for("expired"))
    assert why(assert_refused(ctx, port, server)) == "certificate has expired"


def test_revoked_cert_refused_without_restart(
    pki: CertificateAuthority, server: Server, port: int
) -> None:
    pki.issue_client("mallory")
    ctx = client_context(pki.bundle_for("mallory"))
    assert get(ctx, port) == "mallory"
    pki.revoke("mallory")  # the server keeps running
    assert why(assert_refused(ctx, port, server)) == "certificate revoked"
    assert get(client_context(pki.bundle_for("alice")), port) == "alice"


def fresh_ca(tmp_path: Path, server: Server) -> tuple[CertificateAuthority, int]:
    """A CA of its own with agent "server" on 127.0.0.1 (served) and client "alice"."""
    ca = CertificateAuthority(tmp_path / "ca")
    ca.init()
    ca.issue_agent("server", ["127.0.0.1"])
    ca.issue_client("alice")
    return ca, server.serve(ca.bundle_for("server"))


def test_unreadable_crl_fails_closed(server: Server, tmp_path: Path) -> None:
    ca, port = fresh_ca(tmp_path, server)
    ctx = client_context(ca.bundle_for("alice"))
    good = ca.crl.read_bytes()
    ca.crl.write_bytes(b"garbage")
    assert why(assert_refused(ctx, port, server)) == "CALLBACK_FAILED"
    ca.crl.write_bytes(good)
    assert get(ctx, port) == "alice"


# -- refused by the client -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "message"),
    [("127.0.0.1", "IP address mismatch"), ("localhost", "Hostname mismatch")],
)
def test_hostname_mismatch_refused(
    pki: CertificateAuthority, server: Server, host: str, message: str
) -> None:
    port = server.serve(pki.bundle_for("elsewhere"))  # SANs: agent-b.test, 10.1.2.3
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as err:
        get(client_context(pki.bundle_for("alice")), port, host=host)
    assert message in err.value.certificate_error.verify_message


def test_revoked_server_refused_by_client(server: Server, tmp_path: Path) -> None:
    pki, port = fresh_ca(tmp_path, server)  # its own CA: 127.0.0.1 names one host only
    assert get(client_context(pki.bundle_for("alice")), port) == "alice"
    pki.revoke("server")
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as err:
        get(client_context(pki.bundle_for("alice")), port)
    assert err.value.certificate_error.verify_message == "certificate revoked"


def test_server_context_is_tls13_only(pki: CertificateAuthority, port: int) -> None:
    ctx = client_context(pki.bundle_for("alice"))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(pki.ca_cert)
    old.load_cert_chain(pki.bundle_for("alice").cert, pki.bundle_for("alice").key)
    with pytest.raises(aiohttp.ClientConnectorError):
        get(old, port)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


# -- the CA ----------------------------------------------------------------------------


def test_ca_files_and_modes(pki: CertificateAuthority) -> None:
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.bundle_for("alice").key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700
    with pytest.raises(PKIError, match="already exists"):
        pki.init()
    with pytest.raises(PKIError, match="already has a certificate"):
        pki.issue_client("alice")
    with pytest.raises(PKIError, match="invalid SAN"):
        pki.issue_agent("bad", ["not a host"])
    with pytest.raises(PKIError, match="invalid SAN"):  # no catastrophic backtracking
        pki.issue_agent("bad", ["a" * 5000 + "!"])
    with pytest.raises(PKIError, match="no certificate"):
        pki.revoke("nobody")


def test_cli_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GODWIT_CA_DIR", str(tmp_path / "ca"))
    from godwit.cli.ca import ca  # imports the whole CLI package: keep it local to this test

    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(ca, list(args))
        assert result.exit_code == code, result.output
        return result.stdout if code == 0 else result.stderr

    assert "CA created" in run("init")
    assert run("init", code=1).startswith("error: a CA already exists in")
    agent = json.loads(run("issue", "host-a", "--san", "10.0.0.1", "--san", "host-a.lan", "--json"))
    assert agent["sans"] == ["10.0.0.1", "host-a.lan"] and agent["role"] == "agent"
    assert json.loads(run("issue", "host-b", "--json"))["sans"] == ["host-b"]
    assert "bob" in run("issue", "bob", "--role", "operator")
    renewed = json.loads(run("renew", "host-a", "--json"))
    assert renewed["serial"] != agent["serial"]
    revoked = json.loads(run("revoke", agent["serial"], "--json"))["revoked"]
    assert [c["serial"] for c in revoked] == [agent["serial"]]
    listed = {c["serial"]: c for c in json.loads(run("list", "--json"))}
    assert listed[agent["serial"]]["revoked"] and not listed[renewed["serial"]]["revoked"]
    assert renewed["serial"] in run("list")
    assert "valid until" in run("crl", "--days", "30")
    key, csr = tmp_path / "h1.key", tmp_path / "h1.csr"
    assert "sign it with" in run("csr", "h1", "--san", "10.0.0.9", "--key", str(key),
                                 "--out", str(csr))
    signed = json.loads(run("sign", str(csr), "--role", "agent", "--json"))
    assert signed["role"] == "agent" and signed["sans"] == ["10.0.0.9"]
    assert json.loads(run("suspend", "h1", "--json"))["suspended"][0]["on_hold"]
    assert "suspended" in run("list")
    assert json.loads(run("release", "h1", "--json"))["released"][0]["serial"] == \
        signed["serial"]
    assert 363 <= json.loads(run("list", "--json"))[-1]["days_left"] <= 365
    assert "'root' is not one of" in run("sign", str(csr), "--role", "root", code=2)
    err = run("issue", "bad/name", code=1)
    assert err.startswith("error: invalid name") and err.count("\n") == 1
    err = run("--ca-dir", str(tmp_path / "none"), "list", code=1)
    assert err == f"error: no CA in {tmp_path / 'none'} (run `godwit ca init`)\n"
