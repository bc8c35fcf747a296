"""The audit log: one JSON line per authenticated request that may change state (any method
but GET and HEAD), refusals included, in ``<state>/audit.log`` (0600).

Each line: time, who (certificate name and role), method, path, HTTP status (or the
exception that ended the request, answered by the error middleware). Bodies are never
logged (they hold containers' environments). Past ``MAX_BYTES`` the log becomes
``audit.log.1`` (replacing the previous one) and a new one starts: bounded, one
generation kept for an operator's log shipper to catch up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from godwit.identity import Identity

log = logging.getLogger("godwit.audit")
READ_ONLY = frozenset({"GET", "HEAD"})
MAX_BYTES = 16 << 20


class AuditLog:
    """Append-only lines in ``path``; a write failure is logged, never fails a request."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, who: Identity | str, method: str, path: str, result: int | str) -> None:
        if method in READ_ONLY:
            return
        name, role = (who.name, who.role) if isinstance(who, Identity) else (who, None)
        line = json.dumps({"time": round(time.time(), 3), "who": name, "role": role,
                           "method": method, "path": path, "result": result})
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                    full = os.fstat(fd).st_size > MAX_BYTES
                finally:
                    os.close(fd)
                if full:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except OSError as exc:
            log.error("cannot write the audit log %s: %s", self.path, exc)


def audit_middleware(audit: AuditLog):
    """Outermost middleware: records each state-changing request with its final status
    (the peer middleware leaves the caller's identity in ``request["identity"]``)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        result: int | str = "no response"
        try:
            response = await handler(request)
            result = response.status
            return response
        except web.HTTPException as exc:
            result = exc.status
            raise
        except BaseException as exc:
            result = type(exc).__name__
            raise
        finally:
            if request.secure:
                who = request.get("identity", "unidentified")
                audit.record(who, request.method, request.path, result)

    return middleware
