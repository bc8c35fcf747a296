"""`godwit ca crl --push`: an operator sends a fresh CRL to every agent over the API.

The agent installs it only if its CA signed it, it has not expired, and it is not older
than the CRL in place (by CRL number), so a replayed old CRL cannot lift a revocation.
The file is replaced atomically: the next connection and request see it (godwit.tls).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp import web
from cryptography import x509

from godwit.errors import Conflict, GodwitError
from godwit.fsio import atomic_write
from godwit.tls import TLSFiles

MAX_CRL_BYTES = 1 << 20


def install_crl(files: TLSFiles, pem: bytes) -> dict:
    """Check ``pem`` against this agent's CA and CRL, then install it; one-line errors."""
    if files.crl is None:
        raise GodwitError("this agent runs without a CRL (--tls-crl): nothing to replace")
    try:
        crl = x509.load_pem_x509_crl(pem)
        ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    except ValueError as exc:
        raise GodwitError(f"not a PEM CRL: {exc}") from None
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise GodwitError("the CRL is not signed by this agent's CA")
    next_update = crl.next_update_utc
    if next_update is None or next_update <= datetime.now(UTC):
        raise GodwitError("the CRL has expired: re-sign it (godwit ca crl)")
    number, installed = _number(crl), _installed_number(files)
    if installed is not None and number < installed:
        raise Conflict(f"the CRL (number {number}) is older than the one installed "
                       f"({installed})")
    if _installed_bytes(files) != pem:  # agents may share one file (a lab): write once
        atomic_write(files.crl, pem, 0o644)
    return {"crl_number": number, "next_update": next_update.isoformat(),
            "revoked": len(crl)}


def _number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return -1


def _installed_bytes(files: TLSFiles) -> bytes | None:
    try:
        return files.crl.read_bytes()  # type: ignore[union-attr]
    except OSError:
        return None


def _installed_number(files: TLSFiles) -> int | None:
    try:
        return _number(x509.load_pem_x509_crl(files.crl.read_bytes()))  # type: ignore[union-attr]
    except (OSError, ValueError):
        return None  # missing or broken: any valid CRL of our CA is better


def crl_handler(files: TLSFiles | None):
    """The `PUT /v1/crl` handler of an agent using ``files`` (None: without TLS)."""

    async def push_crl(request: web.Request) -> web.Response:
        if files is None:
            raise GodwitError("this agent runs without TLS: it has no CRL")
        pem = await request.content.read(MAX_CRL_BYTES + 1)
        if len(pem) > MAX_CRL_BYTES:
            raise GodwitError(f"a CRL is at most {MAX_CRL_BYTES} bytes")
        return web.json_response(await asyncio.to_thread(install_crl, files, pem))

    return push_crl
