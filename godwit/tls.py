"""TLS contexts for mutual TLS 1.3 between agents and the CLI.

Both sides trust only the godwit CA and check the CRL of the leaf certificate. A CRL (or
certificate) rewritten on disk is picked up without a restart:

* server side: the context's ``sni_callback`` runs for every new connection (with or without
  SNI) and swaps in a context rebuilt whenever one of the files changed (mtime, size, inode);
* client side: ``client_context`` returns a cached context, rebuilt when a file changed, so
  calling it per request (or per connection) is cheap and always current.

Files must be replaced atomically (write a temporary file, then rename); a file that cannot
be loaded makes the handshake fail (fail closed) until it is fixed.

Connections established before a revocation are not re-checked. Session tickets are disabled
on servers, so a revoked or expired certificate cannot come back through resumption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiohttp import web

log = logging.getLogger(__name__)

CRL_WARN_BEFORE = timedelta(days=7)
CERT_WARN_BEFORE = timedelta(days=30)

_Fingerprint = tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one identity: CA certificate, own certificate and key, optional CRL."""

    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None


def _fingerprint(files: TLSFiles) -> _Fingerprint:
    """Identity of the files' current content: (inode, mtime_ns, size, ctime_ns) each."""
    paths = [files.ca, files.cert, files.key] + ([files.crl] if files.crl else [])
    stats = [os.stat(p) for p in paths]
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size, s.st_ctime_ns) for s in stats)


def _base_context(purpose: ssl.Purpose, files: TLSFiles) -> ssl.SSLContext:
    """A TLS 1.3-only context trusting only the godwit CA, presenting our certificate."""
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    if files.crl is not None:
        ctx.load_verify_locations(cafile=str(files.crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        _warn_if_crl_expires(files.crl)
    _warn_if_cert_expires(files.cert)
    return ctx


def _warn_if_cert_expires(cert: Path) -> None:
    """Log a warning when our own certificate is close to (or past) its expiry."""
    with contextlib.suppress(OSError, ValueError):
        not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
        if not_after - datetime.now(UTC) < CERT_WARN_BEFORE:
            log.warning("certificate %s expires %s: renew it (godwit ca renew, or csr + sign)",
                        cert, not_after)


def expiry(files: TLSFiles) -> dict[str, int | None]:
    """Whole days left before our certificate expires and the CRL must be re-signed (None:
    unreadable, or no CRL), for `godwit hosts`."""
    now = datetime.now(UTC)
    days: dict[str, int | None] = {"certificate_days_left": None, "crl_days_left": None}
    with contextlib.suppress(OSError, ValueError):
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        days["certificate_days_left"] = (cert.not_valid_after_utc - now).days
    with contextlib.suppress(OSError, ValueError, TypeError):
        next_update = x509.load_pem_x509_crl(files.crl.read_bytes()).next_update_utc  # type: ignore[union-attr]
        days["crl_days_left"] = (next_update - now).days  # type: ignore[operator]
    return days


def _warn_if_crl_expires(crl: Path) -> None:
    """Log a warning when the CRL is close to (or past) its next_update."""
    try:
        next_update = x509.load_pem_x509_crl(crl.read_bytes()).next_update_utc
    except (OSError, ValueError):
        return  # OpenSSL already rejected or accepted it; nothing more to say
    if next_update is not None and next_update - datetime.now(UTC) < CRL_WARN_BEFORE:
        log.warning("CRL %s expires %s: re-sign it (godwit ca crl)", crl, next_update)


def _new_server_context(files: TLSFiles) -> ssl.SSLContext:
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, files)
    ctx.num_tickets = 0  # no resumption: every connection presents and verifies a cert
    return ctx


def _new_client_context(files: TLSFiles) -> ssl.SSLContext:
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, files)
    ctx.check_hostname = True
    return ctx


class _Reloader:
    """Keeps the context built from the current files; rebuilds it when a file changes."""

    def __init__(self, files: TLSFiles, build: Callable[[TLSFiles], ssl.SSLContext]) -> None:
        self._files, self._build = files, build
        self._lock = threading.Lock()
        self._key: _Fingerprint | None = None
        self._ctx: ssl.SSLContext | None = None

    def current(self) -> ssl.SSLContext:
        """The context for the files as they are now (raises if they cannot be loaded)."""
        with self._lock:
            key = _fingerprint(self._files)
            if key != self._key or self._ctx is None:
                self._ctx = self._build(self._files)
                self._key = key
                log.debug("TLS context (re)loaded from %s", self._files)
            return self._ctx


def server_context(files: TLSFiles) -> ssl.SSLContext:
    """Server context: TLS 1.3, client certificate required, CA + CRL checked, hot reload.

    Every new connection switches to a context rebuilt from the files if they changed since
    the previous connection, so a new CRL (or renewed certificate) applies without restart.
    """
    reloader = _Reloader(files, _new_server_context)
    outer = reloader.current()

    def swap(sock: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: object) -> int | None:
        try:
            ctx = reloader.current()
        except (OSError, ssl.SSLError) as e:
            log.error("cannot reload TLS files %s: %s; refusing the connection", files, e)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if ctx is not sock.context:
            sock.context = ctx
        return None

    outer.sni_callback = swap
    return outer


_client_reloaders: dict[TLSFiles, _Reloader] = {}
_client_lock = threading.Lock()


def client_context(files: TLSFiles) -> ssl.SSLContext:
    """Client context: TLS 1.3, presents our certificate, verifies server cert + hostname.

    Cached per ``files`` and rebuilt when a file changes: call it per request or per
    connection rather than keeping the result, so a new CRL is honoured. Do not modify it.
    """
    with _client_lock:
        reloader = _client_reloaders.setdefault(files, _Reloader(files, _new_client_context))
    return reloader.current()


def peer_identity(request: web.Request) -> str:
    """Subject common name of the verified peer certificate of an aiohttp request.

    Raises ``HTTPForbidden`` when the connection carries no verified client certificate.
    """
    from aiohttp import web

    cert = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise web.HTTPForbidden(text="no verified client certificate")


class RevocationList:
    """Serials revoked by the CA's CRL file, re-read whenever the file changes: lets an
    agent refuse a revoked peer on a connection opened before the revocation."""

    def __init__(self, files: TLSFiles) -> None:
        self._files = files
        self._key: tuple[int, int, int] | None = None
        self._serials: frozenset[int] = frozenset()

    def is_revoked(self, serial: int) -> bool:
        crl = self._files.crl
        if crl is None:
            return False
        stat = os.stat(crl)
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key != self._key:
            self._serials = _revoked_serials(crl, self._files.ca)
            self._key = key
        return serial in self._serials


def _revoked_serials(crl_path: Path, ca_path: Path) -> frozenset[int]:
    from cryptography import x509

    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise ssl.SSLError(f"CRL {crl_path} is not signed by the godwit CA")
    return frozenset(entry.serial_number for entry in crl)


def peer_certificate(request: web.Request):  # -> x509.Certificate | None
    """The verified certificate the peer of an aiohttp request presented, if any."""
    from cryptography import x509

    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    return x509.load_der_x509_certificate(der) if der else None
