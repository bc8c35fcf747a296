"""The post-copy page server serves only the destination of its migration: CRIU's
`tls-peer-name` (scripts/criu-patches/0012) checks the client's certificate, which godwit
sets to the destination's address (godwit.migration.post_copy.page_server_options)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port

from godwit.criu import CRIU
from godwit.migration.post_copy import page_server_options
from godwit.pki import CertificateAuthority
from godwit.tls import TLSFiles, client_context

pytestmark = pytest.mark.integration
SOURCE, DESTINATION, OTHER = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority(tmp_path / "ca")
    authority.init()
    for name, address in (("src", SOURCE), ("dst", DESTINATION), ("other", OTHER)):
        authority.issue_agent(name, [address])
    return authority


def page_server(tmp_path: Path, ca: CertificateAuthority, port: int) -> subprocess.Popen:
    """`criu page-server` with the options a post-copy dump gets towards DESTINATION."""
    images = tmp_path / "images"
    images.mkdir()
    config = tmp_path / "criu.conf"
    config.write_text("\n".join(page_server_options(SOURCE, ca.bundle_for("src"),
                                                    DESTINATION)) + "\n")
    argv = [CRIU, "page-server", "--config", str(config), "--images-dir", str(images),
            "--port", str(port), "-o", str(tmp_path / "page-server.log"), "-v4"]
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.poll() is None:
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout
        if listening.strip():
            return server
        time.sleep(0.05)
    server.kill()
    raise AssertionError(f"criu page-server did not listen: {(tmp_path / 'page-server.log')}")


def served(files: TLSFiles, port: int) -> bool:
    """Does the page server keep a TLS session with this certificate open?"""
    context = client_context(files)
    with socket.create_connection((SOURCE, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=SOURCE) as conn:
        conn.settimeout(1)
        try:
            return conn.recv(1) != b""
        except TimeoutError:
            return True  # it waits for page requests: this client is served
        except (ssl.SSLError, ConnectionError):
            return False


def test_criu_knows_tls_peer_name() -> None:
    help_text = subprocess.run([CRIU, "--help"], capture_output=True, text=True).stdout
    assert "--tls-peer-name" in help_text, "CRIU lacks scripts/criu-patches/0012"


@pytest.mark.parametrize(("client", "allowed"), [("other", False), ("dst", True)])
def test_only_the_destination_may_fetch_pages(tmp_path: Path, ca: CertificateAuthority,
                                              client: str, allowed: bool) -> None:
    port = free_port(SOURCE)
    server = page_server(tmp_path, ca, port)
    try:
        assert served(ca.bundle_for(client), port) == allowed
    finally:
        server.kill()
        server.wait()
