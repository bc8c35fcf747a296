"""Which roles may call which agent route, and which agent owns an incoming migration.

Least privilege: a viewer reads; an operator drives containers and migrations; an agent
only does what a migration source needs of its destination (info, clock, CPU check, the
container's state, and ``/v1/incoming*``). A route missing from ``RULES`` is refused to
everyone, so a new route must be given its roles here.

An incoming migration belongs to the agent that prepared it (``POST /v1/incoming``): only
that certificate's name may act on it afterwards.
"""

from __future__ import annotations

from pathlib import Path

from godwit.fsio import atomic_write
from godwit.identity import Identity

READ = frozenset({"viewer", "operator"})
READ_ALL = frozenset({"viewer", "operator", "agent"})
OPERATE = frozenset({"operator"})
AGENT = frozenset({"agent"})

RULES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/v1/info"): READ_ALL,
    ("GET", "/v1/openapi.json"): READ_ALL,
    ("GET", "/metrics"): READ,
    ("PUT", "/v1/crl"): OPERATE,
    ("GET", "/v1/containers"): READ,
    ("POST", "/v1/containers"): OPERATE,
    ("GET", "/v1/containers/{name}"): READ_ALL,
    ("DELETE", "/v1/containers/{name}"): OPERATE,
    ("POST", "/v1/containers/{name}/exec"): OPERATE,
    ("POST", "/v1/containers/{name}/signal"): OPERATE,
    ("POST", "/v1/containers/{name}/resume"): OPERATE,
    ("POST", "/v1/containers/{name}/migrate"): OPERATE,
    ("POST", "/v1/containers/{name}/adopt"): OPERATE,
    ("POST", "/v1/containers/{name}/release"): OPERATE,
    ("GET", "/v1/time"): READ_ALL,
    ("POST", "/v1/preflight"): OPERATE,
    ("POST", "/v1/preflight/cpuinfo"): AGENT | OPERATE,
    ("POST", "/v1/preflight/admission"): AGENT | OPERATE,
    ("GET", "/v1/migrations"): READ,
    ("GET", "/v1/migrations/{id}"): READ,
    ("GET", "/v1/migrations/{id}/logs"): READ,
    ("POST", "/v1/incoming"): AGENT,
    ("PUT", "/v1/incoming/{id}/{what}"): AGENT,
    ("POST", "/v1/incoming/{id}/arm"): AGENT,
    ("POST", "/v1/incoming/{id}/activate"): AGENT,
    ("POST", "/v1/incoming/{id}/restore"): AGENT,
    ("POST", "/v1/incoming/{id}/restore-images"): AGENT,
    ("POST", "/v1/incoming/{id}/commit"): AGENT,
    ("POST", "/v1/incoming/{id}/forget"): AGENT,
    ("GET", "/v1/incoming/{id}"): AGENT,
    ("GET", "/v1/incoming/{id}/pages"): AGENT,
    ("DELETE", "/v1/incoming/{id}"): AGENT,
}
OWNER_FILE = "owner"


def refusal(identity: Identity, method: str, route: str) -> str | None:
    """Why ``identity`` may not call ``method route`` (a route pattern), or None."""
    allowed = RULES.get(("GET" if method == "HEAD" else method, route))
    if allowed is None:
        return f"{method} {route} has no authorization rule"
    if identity.role not in allowed:
        return f"{identity.role} certificate {identity.name!r} may not {method} {route}"
    return None


class MigrationOwners:
    """The preparer of each incoming migration, in ``<incoming>/<id>/owner``."""

    def __init__(self, incoming: Path) -> None:
        self.incoming = incoming

    def bind(self, migration_id: str, identity: Identity) -> None:
        """Record the preparer of a migration just prepared (first one wins)."""
        staging = self.incoming / migration_id
        if staging.is_dir() and not (staging / OWNER_FILE).exists():
            atomic_write(staging / OWNER_FILE, identity.name.encode())

    def refusal(self, migration_id: str, identity: Identity) -> str | None:
        """Why ``identity`` may not act on the migration, or None (also when it is unknown
        here, so the source can hear "unknown")."""
        staging = self.incoming / migration_id
        if "/" in migration_id or migration_id in ("", ".", "..") or not staging.is_dir():
            return None
        owner = staging / OWNER_FILE
        name = owner.read_text() if owner.exists() else None
        if name != identity.name:
            return f"migration {migration_id} was prepared by another agent, not {identity.name!r}"
        return None
