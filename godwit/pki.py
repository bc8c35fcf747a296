"""The godwit certificate authority: a small file-based CA for agents and operators.

Layout of the CA directory (mode 0700)::

    ca.key  ca.crt  crl.pem  index.json  issued/<name>.crt  issued/<name>.key

Keys are EC P-256 and written with mode 0600. Every file is replaced atomically (temporary
file + rename), so agents watching ``crl.pem`` never read a half-written file.

Every certificate carries one role in its subject's organizational unit (OU): ``agent``
(a host; its SANs name that host and no other live certificate may hold them), ``operator``
(drives containers and migrations) or ``viewer`` (read-only). The CA alone chooses the
subject, so a CSR cannot ask for a role. Hosts should keep their key: ``make_csr`` writes a
key and a CSR on the host, and ``sign`` turns the CSR into a certificate on the CA.

Renewal issues a new key and certificate under the same name, SANs and role, with a new
serial; the previous certificate stays valid until it expires or is revoked (revoke it by
serial once every host uses the new one). Revoking by name revokes every unrevoked
certificate of that name, old and renewed alike. ``suspend`` revokes with the reason
certificateHold and ``release`` lifts the hold. The CRL must be copied to every agent and
re-signed (``refresh_crl``) before its ``next_update``: agents refuse every peer once their
CRL has expired.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from godwit.fsio import atomic_write
from godwit.tls import TLSFiles

Role = Literal["agent", "operator", "viewer", "service"]
ROLES: tuple[Role, ...] = ("agent", "operator", "viewer", "service")
# roles whose certificates name hosts (SANs; server and client auth): an agent names its
# one host; a service (an etcd member) may share its names with other members
SERVERS: tuple[Role, ...] = ("agent", "service")
_LEGACY_KINDS = {"agent": "agent", "client": "operator"}  # index.json before roles

CRL_DAYS = 90
SERIAL_BITS = 72
CLOCK_SKEW = timedelta(minutes=5)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")


class PKIError(Exception):
    """A user-facing CA failure; the message is one line."""


@dataclass
class IssuedCert:
    """One certificate issued by the CA, as recorded in ``index.json``."""

    name: str
    serial: str  # lowercase hex, no separators
    role: Role
    sans: list[str] = field(default_factory=list)
    not_after: datetime = field(default_factory=lambda: datetime.now(UTC))
    revoked: bool = False
    revoked_at: datetime | None = None
    on_hold: bool = False  # revoked with reason certificateHold: `release` lifts it

    def live(self, now: datetime) -> bool:
        """Neither revoked (nor suspended) nor expired."""
        return not self.revoked and self.not_after > now

    def days_left(self, now: datetime | None = None) -> int:
        """Whole days until the certificate expires (negative once expired)."""
        return (self.not_after - (now or datetime.now(UTC))).days

    def status(self) -> str:
        return "suspended" if self.on_hold else "revoked" if self.revoked else "valid"

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (datetimes as ISO 8601)."""
        d = asdict(self)
        d["not_after"] = self.not_after.isoformat()
        d["revoked_at"] = self.revoked_at.isoformat() if self.revoked_at else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IssuedCert:
        revoked_at = datetime.fromisoformat(d["revoked_at"]) if d.get("revoked_at") else None
        fields = {**d, "not_after": datetime.fromisoformat(d["not_after"])}
        if "kind" in fields:  # written before roles: agent or client (an operator)
            fields["role"] = _LEGACY_KINDS[fields.pop("kind")]
        return cls(**(fields | {"revoked_at": revoked_at}))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _general_name(san: str) -> x509.GeneralName:
    """An IP address or DNS name SAN; raises PKIError for anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        pass
    if not _DNS.fullmatch(san):
        raise PKIError(f"invalid SAN {san!r}: neither an IP address nor a DNS name")
    return x509.DNSName(san.rstrip(".").lower())


def _normalise_serial(text: str) -> str | None:
    """``text`` as a lowercase hex serial without separators, or None if not hex."""
    s = text.strip().lower().removeprefix("0x").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]+", s):
        return None
    return s.lstrip("0") or "0"


def _new_serial(taken: set[str]) -> str:
    """A fresh random 72-bit serial (short enough to type, CA/B-style >= 64 bits random)."""
    while True:
        serial = format(secrets.randbits(SERIAL_BITS), "x")
        if serial != "0" and serial not in taken:
            return serial


def subject_for(name: str, role: Role) -> x509.Name:
    """A leaf's subject: CN = its name (a host's name for agents), OU = its godwit role."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])


def make_csr(name: str, sans: list[str], key_path: Path) -> bytes:
    """On the host: write a new key to ``key_path`` (0600, never overwritten) and return a
    PEM CSR for ``name`` and ``sans``; the CA's ``sign`` adds the role."""
    if not _NAME.fullmatch(name):
        raise PKIError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-'")
    general = [_general_name(s) for s in sans]
    if key_path.exists():
        raise PKIError(f"{key_path} exists; move it away or pick another --key path")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    atomic_write(key_path, _key_pem(key), 0o600)
    return csr.public_bytes(serialization.Encoding.PEM)


def _csr_sans(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in names if isinstance(n, x509.DNSName | x509.IPAddress)]


def _check_role(name: str, role: str, sans: list[str]) -> None:
    if role not in ROLES:
        raise PKIError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if role in SERVERS and not sans:
        raise PKIError(f"{role} {name!r} needs at least one SAN (DNS name or IP address)")
    if role not in SERVERS and sans:
        raise PKIError(f"a {role} certificate names no host: drop the SANs of {name!r}")


def _check_unique(index: list[IssuedCert], name: str, sans: list[str], renewal: bool,
                  role: Role) -> None:
    """One live certificate per name (unless renewing), and a SAN names one agent only
    (services, such as etcd members sharing `etcd.godwit`, may share theirs); a suspended
    certificate still holds its name and SANs (it may be released)."""
    now = datetime.now(UTC)
    live = [e for e in index if e.not_after > now and (not e.revoked or e.on_hold)]
    if not renewal and any(e.name == name for e in live):
        raise PKIError(f"{name!r} already has a certificate; use `renew` or `revoke`")
    wanted = {_san_key(s) for s in sans}
    for e in live:
        if role != "agent" or e.role != "agent":
            continue
        if e.name != name and (clash := wanted & {_san_key(s) for s in e.sans}):
            raise PKIError(f"SAN {sorted(clash)[0]} already names {e.name!r}; revoke it first")


def _san_key(san: str) -> str:
    """A SAN in one spelling (IP addresses compressed, DNS names lowercase, no final dot)."""
    try:
        return str(ipaddress.ip_address(san))
    except ValueError:
        return san.rstrip(".").lower()


def _select(index: list[IssuedCert], serial_or_name: str) -> list[IssuedCert]:
    """Entries of that name, or else the entry of that serial."""
    by_name = [e for e in index if e.name == serial_or_name]
    serial = _normalise_serial(serial_or_name)
    return by_name or [e for e in index if e.serial == serial]


class CertificateAuthority:
    """A godwit CA rooted at ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.ca_key = self.dir / "ca.key"
        self.ca_cert = self.dir / "ca.crt"
        self.crl = self.dir / "crl.pem"
        self.index = self.dir / "index.json"
        self.issued = self.dir / "issued"

    # -- public API --------------------------------------------------------------------

    def init(self, name: str = "godwit CA", days: int = 3650) -> x509.Certificate:
        """Create the CA key, certificate, an empty CRL and index; never overwrites a CA."""
        if any(p.exists() for p in (self.ca_key, self.ca_cert, self.index)):
            raise PKIError(f"a CA already exists in {self.dir}; refusing to overwrite it")
        self._check_days(days)
        self.issued.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with self._locked():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._ca_certificate(key, name, days)
            atomic_write(self.ca_key, _key_pem(key), 0o600)
            atomic_write(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            self._write_index([])
            self._write_crl(key, cert, [], CRL_DAYS)
        return cert

    def issue_agent(self, name: str, sans: list[str], days: int = 365) -> IssuedCert:
        """Issue an agent certificate (server + client auth) for DNS/IP ``sans``."""
        return self.issue(name, "agent", sans, days)

    def issue_client(self, name: str, days: int = 365, role: Role = "operator") -> IssuedCert:
        """Issue an operator (or viewer) certificate: client auth only."""
        return self.issue(name, role, [], days)

    def issue(self, name: str, role: Role, sans: list[str], days: int = 365) -> IssuedCert:
        """Issue a key and a certificate of ``role``; agents need SANs, others take none."""
        _check_role(name, role, sans)
        return self._issue_days(name, role, sans, days)

    def sign(self, csr_pem: bytes, role: Role, days: int = 365,
             renewal: bool = False) -> IssuedCert:
        """Certificate for a CSR made on its host (``make_csr``): the name and SANs come from
        the CSR, the role from the CA; the key never reaches the CA."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise PKIError(f"not a PEM certificate signing request: {e}") from None
        if not csr.is_signature_valid:
            raise PKIError("the CSR's signature does not match its key")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise PKIError("the CSR has no common name (the certificate's name)")
        name, sans = str(names[0].value), _csr_sans(csr)
        _check_role(name, role, sans)
        self._check_days(days)
        now = datetime.now(UTC)
        return self._issue(name, role, sans, now - CLOCK_SKEW, now + timedelta(days=days),
                           renewal, public_key=csr.public_key())

    def renew(self, name: str, days: int = 365) -> IssuedCert:
        """New key + certificate with the same name, SANs and role; the old one stays valid."""
        entries = [e for e in self._read_index() if e.name == name]
        if not entries:
            raise PKIError(f"no certificate named {name!r}")
        last = entries[-1]
        return self._issue_days(name, last.role, last.sans, days, renewal=True)

    def revoke(self, serial_or_name: str, hold: bool = False) -> list[IssuedCert]:
        """Revoke every unrevoked (or suspended) certificate of a name, renewed and old
        alike, or one by serial; ``hold`` suspends instead (reason certificateHold).
        Rewrites the CRL."""
        key, cert = self._load_ca()
        with self._locked():
            index = self._read_index()
            hits = [e for e in _select(index, serial_or_name)
                    if not e.revoked or (e.on_hold and not hold)]  # a hold made permanent
            if not hits:
                raise PKIError(f"no certificate to revoke with serial or name {serial_or_name!r}")
            now = datetime.now(UTC)
            for e in hits:
                e.revoked, e.revoked_at, e.on_hold = True, now, hold
            self._write_index(index)
            self._write_crl(key, cert, index, CRL_DAYS)
        return hits

    def suspend(self, serial_or_name: str) -> list[IssuedCert]:
        """Revoke with reason certificateHold; ``release`` makes the certificate valid again."""
        return self.revoke(serial_or_name, hold=True)

    def release(self, serial_or_name: str) -> list[IssuedCert]:
        """Lift a suspension: the certificates leave the CRL. Revoked ones stay revoked."""
        key, cert = self._load_ca()
        with self._locked():
            index = self._read_index()
            hits = [e for e in _select(index, serial_or_name) if e.on_hold]
            if not hits:
                raise PKIError(f"no suspended certificate with serial or name {serial_or_name!r}")
            for e in hits:
                e.revoked, e.revoked_at, e.on_hold = False, None, False
            self._write_index(index)
            self._write_crl(key, cert, index, CRL_DAYS)
        return hits

    def refresh_crl(self, days: int = CRL_DAYS) -> datetime:
        """Re-sign the CRL (same revocations, new next_update); returns next_update."""
        self._check_days(days)
        key, cert = self._load_ca()
        with self._locked():
            return self._write_crl(key, cert, self._read_index(), days)

    def bundle_for(self, name: str) -> TLSFiles:
        """Paths of the CA certificate, the named certificate and key, and the CRL."""
        files = TLSFiles(
            ca=self.ca_cert,
            cert=self.issued / f"{name}.crt",
            key=self.issued / f"{name}.key",
            crl=self.crl,
        )
        if not _NAME.fullmatch(name) or not files.cert.exists():
            raise PKIError(f"no certificate named {name!r} in {self.dir}")
        return files

    def list(self) -> list[IssuedCert]:
        """Every certificate issued, oldest first (revoked and renewed ones included)."""
        self._load_ca()
        return self._read_index()

    # -- internals ---------------------------------------------------------------------

    @staticmethod
    def _check_days(days: int) -> None:
        if days < 1:
            raise PKIError(f"validity must be at least 1 day, not {days}")

    def _issue_days(
        self, name: str, role: Role, sans: list[str], days: int, renewal: bool = False
    ) -> IssuedCert:
        self._check_days(days)
        now = datetime.now(UTC)
        return self._issue(name, role, sans, now - CLOCK_SKEW, now + timedelta(days=days), renewal)

    def _issue(
        self,
        name: str,
        role: Role,
        sans: list[str],
        not_before: datetime,
        not_after: datetime,
        renewal: bool = False,
        public_key: Any = None,
    ) -> IssuedCert:
        """Issue a certificate valid from ``not_before`` to ``not_after`` (tests use the past);
        with ``public_key`` (a signed CSR) no key is made here."""
        if not _NAME.fullmatch(name):
            raise PKIError(f"invalid name {name!r}: use letters, digits, '.', '_' and '-'")
        for san in sans:
            _general_name(san)  # validate before taking the lock
        ca_key, ca_cert = self._load_ca()
        with self._locked():
            index = self._read_index()
            _check_unique(index, name, sans, renewal, role)
            key = ec.generate_private_key(ec.SECP256R1()) if public_key is None else None
            serial = _new_serial({e.serial for e in index})
            not_after = min(not_after, ca_cert.not_valid_after_utc)
            entry = IssuedCert(name, serial, role, list(sans), not_after)
            cert = self._leaf(ca_key, ca_cert, public_key or key.public_key(), entry, not_before)
            if key is not None:
                atomic_write(self.issued / f"{name}.key", _key_pem(key), 0o600)
            else:  # a key made for an earlier certificate of this name is not this one's
                (self.issued / f"{name}.key").unlink(missing_ok=True)
            atomic_write(self.issued / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM),
                        0o644)
            self._write_index([*index, entry])
        return entry

    @staticmethod
    def _ca_certificate(key: ec.EllipticCurvePrivateKey, name: str, days: int) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )

    @staticmethod
    def _leaf(
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        public_key: Any,
        entry: IssuedCert,
        not_before: datetime,
    ) -> x509.Certificate:
        """The certificate described by ``entry``, for ``public_key``, signed by the CA."""
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if entry.role in SERVERS:
            eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject_for(entry.name, entry.role))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(int(entry.serial, 16))
            .not_valid_before(not_before)
            .not_valid_after(entry.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
        )
        if entry.sans:
            sans = x509.SubjectAlternativeName([_general_name(s) for s in entry.sans])
            builder = builder.add_extension(sans, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def _write_crl(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        index: list[IssuedCert],
        days: int,
    ) -> datetime:
        """Sign and atomically write ``crl.pem`` listing the revoked entries of ``index``."""
        now = datetime.now(UTC)
        next_update = now + timedelta(days=days)
        ca_ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(next_update)
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
            )
        )
        for e in index:
            if e.revoked:
                revoked = (
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(e.serial, 16))
                    .revocation_date(e.revoked_at or now)
                )
                if e.on_hold:
                    reason = x509.CRLReason(x509.ReasonFlags.certificate_hold)
                    revoked = revoked.add_extension(reason, critical=False)
                revoked = revoked.build()
                builder = builder.add_revoked_certificate(revoked)
        crl = builder.sign(key, hashes.SHA256())
        atomic_write(self.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return next_update

    def _load_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.ca_key.exists() or not self.ca_cert.exists():
            raise PKIError(f"no CA in {self.dir} (run `godwit ca init`)")
        try:
            key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        except (ValueError, TypeError) as e:
            raise PKIError(f"cannot load the CA in {self.dir}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{self.ca_key} is not an EC private key")
        return key, cert

    def _read_index(self) -> list[IssuedCert]:
        try:
            return [IssuedCert.from_json(d) for d in json.loads(self.index.read_text())]
        except FileNotFoundError:
            raise PKIError(f"no CA in {self.dir} (run `godwit ca init`)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise PKIError(f"corrupt {self.index}: {e}") from None

    def _write_index(self, index: list[IssuedCert]) -> None:
        data = json.dumps([e.to_json() for e in index], indent=2) + "\n"
        atomic_write(self.index, data.encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers (concurrent CLI invocations) with an flock on ``.lock``."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
