"""The CA's life cycle: roles, unique names and SANs, CSRs, suspension, renew then revoke."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from godwit.authz import RULES, MigrationOwners, refusal
from godwit.identity import Identity, IdentityError, identity_of
from godwit.pki import CertificateAuthority, PKIError, make_csr


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority(tmp_path / "ca")
    authority.init()
    return authority


def cert_of(ca: CertificateAuthority, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.bundle_for(name).cert.read_bytes())


def crl_entries(ca: CertificateAuthority) -> dict[int, x509.RevokedCertificate]:
    return {e.serial_number: e for e in x509.load_pem_x509_crl(ca.crl.read_bytes())}


@pytest.mark.parametrize("role", ["agent", "operator", "viewer"])
def test_the_role_is_in_the_certificate(ca: CertificateAuthority, role: str) -> None:
    ca.issue("h1", role, ["h1.lan"] if role == "agent" else [])  # type: ignore[arg-type]
    assert identity_of(cert_of(ca, "h1")) == Identity("h1", role)  # type: ignore[arg-type]


def test_roles_and_sans_go_together(ca: CertificateAuthority) -> None:
    with pytest.raises(PKIError, match="needs at least one SAN"):
        ca.issue("h1", "agent", [])
    with pytest.raises(PKIError, match="names no host"):
        ca.issue("ops", "operator", ["10.0.0.1"])
    with pytest.raises(PKIError, match="unknown role 'root'"):
        ca.issue("ops", "root", [])  # type: ignore[arg-type]


def test_a_san_names_one_host_only(ca: CertificateAuthority) -> None:
    ca.issue_agent("h1", ["10.0.0.1", "h1.lan"])
    with pytest.raises(PKIError, match=r"SAN 10\.0\.0\.1 already names .h1."):
        ca.issue_agent("h2", ["10.0.0.1"])
    with pytest.raises(PKIError, match=r"SAN h1\.lan already names .h1."):
        ca.issue_agent("h2", ["H1.LAN."])
    with pytest.raises(PKIError, match="already has a certificate"):
        ca.issue_agent("h1", ["10.0.0.9"])
    ca.suspend("h1")
    with pytest.raises(PKIError, match="already names 'h1'"):
        ca.issue_agent("h2", ["10.0.0.1"])  # a suspended certificate may come back
    ca.revoke("h1")
    ca.issue_agent("h2", ["10.0.0.1"])  # free again once revoked


def test_services_share_names_and_no_agent_accepts_them(ca: CertificateAuthority) -> None:
    """etcd members share `etcd.godwit` (and an address when co-located); their
    certificates are servers, but no route of an agent takes the role."""
    ca.issue("etcd1", "service", ["10.0.0.1", "etcd.godwit"])
    ca.issue("etcd2", "service", ["10.0.0.2", "etcd.godwit"])
    ca.issue_agent("h1", ["10.0.0.1"])  # an agent on a member's host
    assert identity_of(cert_of(ca, "etcd2")) == Identity("etcd2", "service")
    with pytest.raises(PKIError, match="needs at least one SAN"):
        ca.issue("etcd3", "service", [])
    for method, route in RULES:
        assert refusal(Identity("etcd1", "service"), method, route) is not None


def test_renew_then_revoke_name_revokes_old_and_new(ca: CertificateAuthority) -> None:
    first = ca.issue_agent("h1", ["10.0.0.1"])
    second = ca.renew("h1")
    revoked = ca.revoke("h1")
    assert {c.serial for c in revoked} == {first.serial, second.serial}
    assert {int(first.serial, 16), int(second.serial, 16)} <= set(crl_entries(ca))
    with pytest.raises(PKIError, match="no certificate to revoke"):
        ca.revoke("h1")


def test_revoke_one_serial_after_renew_keeps_the_new_one(ca: CertificateAuthority) -> None:
    first = ca.issue_agent("h1", ["10.0.0.1"])
    second = ca.renew("h1")
    assert [c.serial for c in ca.revoke(first.serial)] == [first.serial]
    assert int(second.serial, 16) not in crl_entries(ca)


def test_suspend_then_release(ca: CertificateAuthority) -> None:
    entry = ca.issue_client("alice")
    ca.suspend("alice")
    hold = crl_entries(ca)[int(entry.serial, 16)]
    reason = hold.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.certificate_hold
    assert [c.status() for c in ca.list()] == ["suspended"]
    ca.release("alice")
    assert crl_entries(ca) == {} and [c.status() for c in ca.list()] == ["valid"]
    ca.revoke("alice")
    with pytest.raises(PKIError, match="no suspended certificate"):
        ca.release("alice")  # a revocation is for good


def test_csr_keeps_the_key_on_the_host(ca: CertificateAuthority, tmp_path: Path) -> None:
    host_key = tmp_path / "host" / "h1.key"
    host_key.parent.mkdir()
    pem = make_csr("h1", ["10.0.0.1"], host_key)
    assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
    entry = ca.sign(pem, "agent")
    assert not (ca.issued / "h1.key").exists(), "the CA never holds the host's key"
    cert = cert_of(ca, "h1")
    assert entry.sans == ["10.0.0.1"] and identity_of(cert) == Identity("h1", "agent")
    host_public = x509.load_pem_x509_csr(pem).public_key()
    assert cert.public_key() == host_public
    with pytest.raises(PKIError, match="exists"):
        make_csr("h1", ["10.0.0.1"], host_key)
    with pytest.raises(PKIError, match="already has a certificate"):
        ca.sign(pem, "agent")
    assert ca.sign(pem, "agent", renewal=True).serial != entry.serial


def test_a_csr_cannot_choose_its_role(ca: CertificateAuthority, tmp_path: Path) -> None:
    """The CA writes the subject: an OU in the CSR does not reach the certificate."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operator"),
        x509.NameAttribute(NameOID.COMMON_NAME, "sneaky")])).sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives.serialization import Encoding

    ca.sign(csr.public_bytes(Encoding.PEM), "viewer")
    assert identity_of(cert_of(ca, "sneaky")).role == "viewer"
    with pytest.raises(PKIError, match="not a PEM certificate signing request"):
        ca.sign(b"garbage", "viewer")


def test_an_index_written_before_roles_still_loads(ca: CertificateAuthority) -> None:
    ca.issue_client("alice")
    data = json.loads(ca.index.read_text())
    data[0]["role"] = None
    data[0] = {("kind" if k == "role" else k): ("client" if k == "role" else v)
               for k, v in data[0].items() if k != "on_hold"}
    ca.index.write_text(json.dumps(data))
    assert ca.list()[0].role == "operator"


def test_every_agent_route_has_an_authorization_rule(tmp_path: Path) -> None:
    from godwit.agent import Agent

    app = Agent("h", tmp_path, tmp_path / "runc").app()
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert routes == set(RULES), routes ^ set(RULES)


@pytest.mark.parametrize(("role", "method", "route", "allowed"), [
    ("viewer", "GET", "/v1/containers", True), ("viewer", "HEAD", "/v1/info", True),
    ("viewer", "POST", "/v1/containers", False), ("agent", "POST", "/v1/containers", False),
    ("agent", "POST", "/v1/containers/{name}/exec", False),
    ("agent", "POST", "/v1/containers/{name}/migrate", False),
    ("operator", "POST", "/v1/incoming", False), ("agent", "POST", "/v1/incoming", True),
    ("operator", "POST", "/v1/unknown", False)])
def test_refusal_table(role: str, method: str, route: str, allowed: bool) -> None:
    reason = refusal(Identity("x", role), method, route)  # type: ignore[arg-type]
    assert (reason is None) == allowed, reason


def test_a_migration_belongs_to_its_preparer(tmp_path: Path) -> None:
    owners, a, b = MigrationOwners(tmp_path), Identity("a", "agent"), Identity("b", "agent")
    assert owners.refusal("1234", b) is None, "unknown here: the source hears 'unknown'"
    (tmp_path / "1234").mkdir()
    assert "prepared by another agent" in (owners.refusal("1234", a) or ""), \
        "staged but not yet bound: nobody"
    owners.bind("1234", a)
    owners.bind("1234", b)  # the first one wins
    assert owners.refusal("1234", a) is None
    assert "prepared by another agent, not 'b'" in (owners.refusal("1234", b) or "")


def test_a_certificate_without_role_names_the_fix(ca: CertificateAuthority) -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), None)
    now = datetime.now(UTC)
    old = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h0")]))
           .issuer_name(cert_of_ca(ca).subject).public_key(key.public_key())
           .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
           .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match=r"no godwit role: re-issue it \(`godwit ca renew h0`"):
        identity_of(old)


def cert_of_ca(ca: CertificateAuthority) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
