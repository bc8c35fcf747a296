"""Who is asking: the host name and godwit role a verified peer certificate carries.

The CA writes the role in the subject's organizational unit (see ``godwit.pki``); an agent
certificate must also allow server authentication, as the CA issues them. Certificates
issued before roles existed carry no role and are refused: re-issue them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from godwit.pki import ROLES, Role


class IdentityError(Exception):
    """The certificate names no usable godwit identity; the message is one line."""


@dataclass(frozen=True)
class Identity:
    """A peer: its certificate's name (an agent's host name) and role."""

    name: str
    role: Role


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity of a verified certificate; raises IdentityError when it has none."""
    name = _one(cert, NameOID.COMMON_NAME)
    if name is None:
        raise IdentityError("the certificate has no common name")
    role = _one(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if role not in ROLES:
        raise IdentityError(f"certificate {name!r} carries no godwit role: re-issue it "
                            f"(`godwit ca renew {name}`, or `godwit ca csr` + `godwit ca sign`)")
    if role == "agent" and not _server_auth(cert):
        raise IdentityError(f"agent certificate {name!r} lacks serverAuth: re-issue it")
    return Identity(name, role)  # type: ignore[arg-type]


def _one(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    """The attribute's value when the subject has exactly one, else None."""
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else None


def _server_auth(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in usage
