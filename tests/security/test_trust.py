"""Least-privilege trust over real mutual TLS: each test fails if its attack succeeds.

Hosts a and b of the testbed run real agents; certificates come from the testbed's CA."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from godwit import transport
from godwit.bundle import load_config, oci_config
from godwit.lab.bundles import counter_bundle
from godwit.lab.testbed import Testbed
from godwit.pki import CertificateAuthority
from godwit.tls import TLSFiles, client_context

pytestmark = pytest.mark.integration


def call(bed: Testbed, host: str, files: TLSFiles, method: str, path: str,
         body: object = None) -> tuple[int, dict]:
    """One request to ``host``'s agent with the certificate ``files``: (status, JSON)."""
    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session, session.request(
                method, f"https://{bed.address(host)}{path}", json=body,
                ssl=client_context(files), timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return resp.status, await resp.json(content_type=None)

    return asyncio.run(go())


def certificate(bed: Testbed, name: str, role: str = "operator") -> TLSFiles:
    """A certificate of ``role`` from the testbed's CA (issued once per name)."""
    if not any(c.name == name for c in bed.ca.list()):
        sans = [f"{name}.test"] if role == "agent" else []
        bed.ca.issue(name, role, sans)  # type: ignore[arg-type]
    return bed.ca.bundle_for(name)


def incoming(config: dict | None = None, **extra: object) -> dict:
    """A prepare request as a source sends it, without network (nothing made but staging)."""
    return {"id": str(uuid.uuid4()), "name": f"sec-{uuid.uuid4().hex[:8]}", "source": "a",
            "config": config or oci_config(["/bin/sh"]), "commit_timeout": 30,
            "idle_timeout": 60, "strategy": "stop-and-copy", "upload_bytes": 0, **extra}


# -- admission on the destination --------------------------------------------------------

@pytest.mark.parametrize("attack", ["hook", "host bind mount", "capability", "timeout"])
def test_a_dangerous_incoming_migration_is_refused(bed: Testbed, attack: str) -> None:
    config = oci_config(["/bin/sh"])
    extra: dict = {}
    if attack == "hook":
        config["hooks"] = {"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "id"]}]}
    elif attack == "host bind mount":
        config["mounts"].append({"destination": "/host", "type": "bind", "source": "/",
                                 "options": ["rbind", "rw"]})
    elif attack == "capability":
        for names in config["process"]["capabilities"].values():
            names.append("CAP_SYS_ADMIN")
    else:
        extra["commit_timeout"] = 1e308  # JSON has no infinity: the largest finite instead
    request = incoming(config, **extra)
    agent_a = bed.ca.bundle_for("a")
    status, body = call(bed, "b", agent_a, "POST", "/v1/incoming", request)
    assert status == 400 and "refused by" in body["error"], body
    words = {"hook": "hooks.createRuntime", "host bind mount": "bind mount of /",
             "capability": "CAP_SYS_ADMIN", "timeout": "commit_timeout"}[attack]
    assert words in body["error"] and "\n" not in body["error"]
    status, state = call(bed, "b", agent_a, "GET", f"/v1/incoming/{request['id']}")
    assert (status, state["state"]) == (200, "unknown"), "nothing may be staged"


def test_a_shared_rootfs_outside_the_storage_roots_is_refused(bed: Testbed) -> None:
    request = incoming(shared_rootfs="/")
    status, body = call(bed, "b", bed.ca.bundle_for("a"), "POST", "/v1/incoming", request)
    assert status == 400 and "shared_rootfs / is outside the storage roots" in body["error"]


# -- a migration belongs to the agent that prepared it ------------------------------------

def test_another_agent_cannot_act_on_a_migration(bed: Testbed) -> None:
    agent_a, mallory = bed.ca.bundle_for("a"), certificate(bed, "c", "agent")
    request = incoming()
    status, body = call(bed, "b", agent_a, "POST", "/v1/incoming", request)
    assert status == 200, body
    mid = request["id"]
    try:
        for method, path, payload in [
                ("GET", f"/v1/incoming/{mid}", None),
                ("PUT", f"/v1/incoming/{mid}/rootfs", None),
                ("POST", f"/v1/incoming/{mid}/arm", {"descriptors": []}),
                ("POST", f"/v1/incoming/{mid}/restore", {}),
                ("POST", f"/v1/incoming/{mid}/commit", {}),
                ("POST", f"/v1/incoming/{mid}/forget", {}),
                ("DELETE", f"/v1/incoming/{mid}", None)]:
            status, body = call(bed, "b", mallory, method, path, payload)
            assert status == 403, (method, path, body)
            assert "prepared by another agent" in body["error"]
        status, state = call(bed, "b", agent_a, "GET", f"/v1/incoming/{mid}")
        assert (status, state["state"]) == (200, "prepared"), "the migration must be untouched"
    finally:
        assert call(bed, "b", agent_a, "DELETE", f"/v1/incoming/{mid}")[0] == 200


# -- roles --------------------------------------------------------------------------------

def test_an_agent_certificate_is_not_an_operator(bed: Testbed, tmp_path: Path) -> None:
    agent_a = bed.ca.bundle_for("a")
    bundle = counter_bundle(bed.bundle_dir("sec-agent-run"))
    for method, path, payload in [
            ("POST", "/v1/containers", {"name": "sec-agent-run", "bundle": str(bundle)}),
            ("POST", "/v1/containers/x/exec", {"argv": ["id"]}),
            ("POST", "/v1/containers/x/migrate", {"to": bed.address("a")}),
            ("DELETE", "/v1/containers/x", None),
            ("GET", "/v1/containers", None)]:
        status, body = call(bed, "b", agent_a, method, path, payload)
        assert status == 403 and "agent certificate 'a' may not" in body["error"], body
    assert call(bed, "b", bed.operator_tls, "GET", "/v1/containers/sec-agent-run")[0] == 404


def test_an_operator_cannot_run_a_bundle_outside_the_storage_roots(
        bed: Testbed, tmp_path: Path) -> None:
    bundle = counter_bundle(tmp_path / "outside")
    result = bed.godwit("run", "sec-outside", "--bundle", str(bundle), "--host", "a")
    assert result.returncode != 0
    assert "is outside the storage roots" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    inside = counter_bundle(bed.bundle_dir("sec-rootfs-escape"))
    config = load_config(inside)
    config["root"]["path"] = "/"
    (inside / "config.json").write_text(json.dumps(config))
    result = bed.godwit("run", "sec-rootfs-escape", "--bundle", str(inside), "--host", "a")
    assert result.returncode != 0 and "root.path / is outside" in result.stderr
    assert call(bed, "a", bed.operator_tls, "GET", "/v1/containers/sec-outside")[0] == 404


def test_a_viewer_can_only_read(bed: Testbed) -> None:
    viewer = certificate(bed, "auditor", "viewer")
    for path in ("/v1/info", "/v1/containers", "/v1/migrations", "/v1/time"):
        assert call(bed, "a", viewer, "GET", path)[0] == 200, path
    bundle = counter_bundle(bed.bundle_dir("sec-viewer"))
    for method, path, payload in [
            ("POST", "/v1/containers", {"name": "sec-viewer", "bundle": str(bundle)}),
            ("POST", "/v1/containers/x/signal", {"signal": "KILL"}),
            ("POST", "/v1/containers/x/resume", {}),
            ("POST", "/v1/containers/x/migrate", {"to": bed.address("b")}),
            ("DELETE", "/v1/containers/x", None),
            ("POST", "/v1/preflight", {"to": bed.address("b")}),
            ("POST", "/v1/incoming", incoming()),
            ("GET", f"/v1/incoming/{uuid.uuid4()}", None)]:
        status, body = call(bed, "a", viewer, method, path, payload)
        assert status == 403 and "viewer certificate 'auditor' may not" in body["error"], body


def test_a_certificate_without_a_role_is_refused(bed: Testbed, tmp_path: Path) -> None:
    """Certificates issued before roles existed (CN only) must be re-issued."""
    ca_key = serialization.load_pem_private_key(bed.ca.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(bed.ca.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-operator")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    files = TLSFiles(ca=bed.ca.ca_cert, cert=tmp_path / "old.crt", key=tmp_path / "old.key",
                     crl=bed.ca.crl)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    status, body = call(bed, "a", files, "GET", "/v1/info")
    assert status == 403 and "carries no godwit role: re-issue it" in body["error"], body


def test_a_suspended_certificate_is_refused_until_released(bed: Testbed) -> None:
    viewer = certificate(bed, "intern", "viewer")
    assert call(bed, "a", viewer, "GET", "/v1/info")[0] == 200
    bed.ca.suspend("intern")
    with pytest.raises(aiohttp.ClientError):  # the handshake fails: the CRL lists it
        call(bed, "a", viewer, "GET", "/v1/info")
    bed.ca.release("intern")
    assert call(bed, "a", viewer, "GET", "/v1/info")[0] == 200


# -- container addresses ------------------------------------------------------------------

@pytest.mark.parametrize("whose", ["gateway", "host b"])
def test_a_gateway_or_host_address_is_refused(bed: Testbed, whose: str) -> None:
    address = bed.net.gateway if whose == "gateway" else bed.host("b").address
    bundle = counter_bundle(bed.bundle_dir(f"sec-ip-{whose[-1]}"))
    result = bed.godwit("run", f"sec-ip-{whose[-1]}", "--bundle", str(bundle), "--host", "a",
                        "--ip", f"{address}/{bed.net.subnet.prefixlen}",
                        "--gateway", bed.net.gateway)
    assert result.returncode != 0, result.stdout
    why = "is the gateway's address" if whose == "gateway" else "is a host's address"
    assert why in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_hosts_show_certificate_and_crl_days_left(bed: Testbed) -> None:
    result = bed.godwit("hosts", "--json")
    assert result.returncode == 0, result.stderr
    tls = json.loads(result.stdout)["a"]["tls"]
    assert 360 <= tls["certificate_days_left"] <= 365 and 80 <= tls["crl_days_left"] <= 90
    assert "CERT/CRL DAYS" in bed.godwit("hosts").stdout


def test_state_changing_requests_are_audited(bed: Testbed) -> None:
    viewer = certificate(bed, "auditor", "viewer")
    missing = f"/v1/containers/sec-{uuid.uuid4().hex[:8]}"
    assert call(bed, "a", bed.operator_tls, "POST", missing + "/signal", {"signal": "TERM"})[0] \
        == 404
    assert call(bed, "a", viewer, "DELETE", missing)[0] == 403
    assert call(bed, "a", viewer, "GET", missing)[0] == 404
    log = bed.host("a").state_dir / "audit.log"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [(e["who"], e["role"], e["method"], e["result"]) for e in lines
            if e["path"].startswith(missing)]
    assert mine == [("operator", "operator", "POST", 404), ("auditor", "viewer", "DELETE", 403)]


def test_crl_push_installs_only_a_fresh_crl_of_our_ca(bed: Testbed, tmp_path: Path) -> None:
    async def put(files: TLSFiles, pem: bytes) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session, session.put(
                f"https://{bed.address('a')}/v1/crl", data=pem,
                ssl=client_context(files)) as resp:
            return resp.status, await resp.json(content_type=None)

    old = bed.ca.crl.read_bytes()
    result = bed.godwit("ca", "--ca-dir", str(bed.ca.dir), "crl", "--push")
    assert result.returncode == 0, result.stderr
    assert "a: installed" in result.stdout and "b: installed" in result.stdout
    fresh = bed.ca.crl.read_bytes()
    status, body = asyncio.run(put(bed.operator_tls, old))
    assert status == 409 and "older than the one installed" in body["error"], body
    other = CertificateAuthority(tmp_path / "other")
    other.init()
    status, body = asyncio.run(put(bed.operator_tls, other.crl.read_bytes()))
    assert status == 400 and "not signed by this agent's CA" in body["error"], body
    assert asyncio.run(put(bed.operator_tls, b"garbage"))[0] == 400
    status, body = asyncio.run(put(certificate(bed, "auditor", "viewer"), fresh))
    assert status == 403, body
    assert bed.ca.crl.read_bytes() == fresh


@contextlib.contextmanager
def sysadmin_on_a(bed: Testbed, name: str) -> Iterator[None]:
    """Container ``name`` runs on a with CAP_SYS_ADMIN, which a's policy admits for the
    while and b's does not."""
    policy_a = bed.host("a").state_dir / "policy.json"
    saved = policy_a.read_text()
    policy = json.loads(saved)
    policy["capabilities"] = [*policy["capabilities"], "CAP_SYS_ADMIN"]
    policy_a.write_text(json.dumps(policy))
    bundle = counter_bundle(bed.bundle_dir(name))
    config = load_config(bundle)
    for names in config["process"]["capabilities"].values():
        names.append("CAP_SYS_ADMIN")
    (bundle / "config.json").write_text(json.dumps(config))
    try:
        run = bed.godwit("run", name, "--bundle", str(bundle), "--host", "a")
        assert run.returncode == 0, run.stderr
        yield
    finally:
        bed.godwit("rm", name)
        policy_a.write_text(saved)


def test_a_refused_migration_fails_before_the_freeze(bed: Testbed) -> None:
    """a admits CAP_SYS_ADMIN, b does not: the migration stops at prepare, and the
    container never stops counting on a."""
    with sysadmin_on_a(bed, "sec-sysadmin"):
        result = bed.godwit("migrate", "sec-sysadmin", "--to", "b", "--json")
        assert result.returncode != 0
        report = json.loads(result.stdout)
        assert "CAP_SYS_ADMIN not allowed" in report["error"], report
        assert report["outcome"] == "running on a (never frozen)", report
        state = call(bed, "a", bed.operator_tls, "GET", "/v1/containers/sec-sysadmin")[1]
        assert state["status"] == "running", state
        assert call(bed, "b", bed.operator_tls, "GET", "/v1/containers/sec-sysadmin")[0] == 404


def test_state_holding_configs_and_environments_is_private(bed: Testbed) -> None:
    """Other local users reach neither the state dir nor a request's or bundle's config."""
    agent_a, request = bed.ca.bundle_for("a"), incoming()
    assert call(bed, "b", agent_a, "POST", "/v1/incoming", request)[0] == 200
    state = bed.host("b").state_dir
    try:
        assert state.stat().st_mode & 0o777 == 0o700
        staged = state / "incoming" / request["id"] / "request.json"
        assert staged.stat().st_mode & 0o777 == 0o600
    finally:
        assert call(bed, "b", agent_a, "DELETE", f"/v1/incoming/{request['id']}")[0] == 200
    bundle = counter_bundle(bed.bundle_dir("sec-private"))
    assert bed.godwit("run", "sec-private", "--bundle", str(bundle), "--host", "b").returncode == 0
    try:
        configs = list(state.glob("containers/sec-private/**/config.json"))
        assert configs and all(c.stat().st_mode & 0o777 == 0o600 for c in configs), configs
    finally:
        bed.godwit("rm", "sec-private")


def _wait_until_accepted(pid: int, timeout: float = 30) -> int:
    """Wait until the agent's count of descriptors stops growing; that count."""
    count, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2)
        now = len(os.listdir(f"/proc/{pid}/fd"))
        if now == count:
            break
        count = now
    return count


def test_idle_unauthenticated_sockets_do_not_stop_a_migration(bed: Testbed) -> None:
    """2 000 TCP connections to b that never start TLS, with b's descriptor limit lowered to
    1 024 (no CAP_SYS_RESOURCE is needed to lower it): a migration a -> b still succeeds."""
    pid = bed.agents["b"].pid
    saved = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    bundle = counter_bundle(bed.bundle_dir("sec-flood"))
    assert bed.godwit("run", "sec-flood", "--bundle", str(bundle), "--host", "a").returncode == 0
    host, port = bed.address("b").rsplit(":", 1)
    idle: list[socket.socket] = []
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, saved[1]))
        for _ in range(2000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((host, int(port)))
            idle.append(sock)
            if len(idle) % 100 == 0:
                time.sleep(0.3)  # within the listen backlog, so each one reaches the agent
        assert _wait_until_accepted(pid) < 1000, "the agent holds a descriptor per socket"
        result = bed.godwit("migrate", "sec-flood", "--to", "b", "--json", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        state = call(bed, "b", bed.operator_tls, "GET", "/v1/containers/sec-flood")[1]
        assert state["status"] == "running", state
    finally:
        for sock in idle:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, saved)
        bed.godwit("rm", "sec-flood")


def _upload(bed: Testbed, host: str, files: TLSFiles, migration_id: str,
            body: bytes) -> tuple[int, dict]:
    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as session, session.put(
                f"https://{bed.address(host)}/v1/incoming/{migration_id}/rootfs", data=body,
                ssl=client_context(files), timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return resp.status, await resp.json(content_type=None)

    return asyncio.run(go())


def _record(**header: object) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(4, "big") + raw


def test_an_upload_larger_than_announced_is_cut_off(bed: Testbed) -> None:
    """The agent that prepared the migration announces 1 MiB, then sends a file header of
    1 GiB (what a few KB of zstd can carry): cut off, the staging dropped."""
    agent_a, request = bed.ca.bundle_for("a"), incoming(upload_bytes=1 << 20)
    assert call(bed, "b", agent_a, "POST", "/v1/incoming", request)[0] == 200
    staging = bed.host("b").state_dir / "incoming" / request["id"]
    assert staging.is_dir()
    header = {"type": "file", "path": "zeros", "mode": 0o644, "uid": 0, "gid": 0,
              "mtime_ns": 0, "size": 1 << 30}
    stream = transport.MAGIC + bytes([transport.VERSION, 0]) + _record(**header) \
        + bytes(64 << 10)
    status, body = _upload(bed, "b", agent_a, request["id"], stream)
    assert status == 400 and "upload cut off: upload larger than announced" in body["error"]
    assert "\n" not in body["error"]
    assert not staging.exists(), "the staging must go with the refused upload"
    assert call(bed, "b", agent_a, "GET", f"/v1/incoming/{request['id']}")[1]["state"] \
        == "unknown"


def test_a_migration_larger_than_the_free_disk_is_refused_at_prepare(bed: Testbed) -> None:
    request = incoming(upload_bytes=1 << 60)
    status, body = call(bed, "b", bed.ca.bundle_for("a"), "POST", "/v1/incoming", request)
    assert status == 400 and "not enough disk on b" in body["error"], body
    assert not (bed.host("b").state_dir / "incoming" / request["id"]).exists()


def test_check_shows_the_destinations_admission_refusal(bed: Testbed) -> None:
    """`godwit check --container`: b's policy refuses CAP_SYS_ADMIN, a's admits it; the
    refusal shows in the pre-flight, nothing staged on b."""
    with sysadmin_on_a(bed, "sec-check"):
        result = bed.godwit("check", "b", "--from", "a", "--container", "sec-check", "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        findings = {f["check"]: f for f in json.loads(result.stdout)["a"]["findings"]}
        assert findings["admission"]["level"] == "error", findings
        assert "CAP_SYS_ADMIN not allowed" in findings["admission"]["message"]
        staged = (bed.host("b").state_dir / "incoming").glob("*/request.json")
        assert not [p for p in staged if json.loads(p.read_text())["name"] == "sec-check"]
        ok = bed.godwit("check", "a", "--from", "b", "--json")
        assert "admission" not in {f["check"] for f in json.loads(ok.stdout)["b"]["findings"]}
