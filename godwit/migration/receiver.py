"""Destination side of a migration: staging, receiving files, restore, commit or abort.

Everything about an incoming migration lives on disk under `<state>/incoming/<id>/`
(request.json, rootfs/, images/, work/, decision), so an agent restart loses nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from godwit import fence
from godwit.containers import ContainerRecord, ContainerStore, check_name
from godwit.errors import Conflict, GodwitError, NotFound
from godwit.transport import TransferError, receive_tree

ID_CHARS = set("0123456789abcdef-")


class Receiver:
    """Incoming migrations of one agent."""

    def __init__(self, store: ContainerStore, state_dir: Path) -> None:
        self.store = store
        self.root = state_dir / "incoming"
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, migration_id: str) -> Path:
        if not migration_id or set(migration_id) - ID_CHARS:
            raise GodwitError(f"invalid migration id {migration_id!r}")
        return self.root / migration_id

    def request(self, migration_id: str) -> dict:
        path = self._dir(migration_id) / "request.json"
        if not path.exists():
            raise NotFound(f"migration {migration_id} unknown on {self.store.host}")
        return json.loads(path.read_text())

    def prepare(self, request: dict) -> dict:
        """Reserve the name and a staging area; check a shared rootfs is visible here."""
        name = check_name(request.get("name", ""))
        staging = self._dir(request.get("id", ""))
        if self.store.exists(name) or self._reserved(name):
            raise Conflict(f"container {name} already exists on {self.store.host}")
        shared = request.get("shared_rootfs")
        if shared and not Path(shared).is_dir():
            raise GodwitError(
                f"shared rootfs {shared} is not visible on {self.store.host}; "
                "drop --shared-storage to transfer it"
            )
        staging.mkdir(parents=True)
        (staging / "request.json").write_text(json.dumps(request))
        return {"id": request["id"], "staging": str(staging)}

    def _reserved(self, name: str) -> bool:
        for path in self.root.glob("*/request.json"):
            if json.loads(path.read_text()).get("name") == name and not self._finished(path.parent):
                return True
        return False

    def _finished(self, staging: Path) -> bool:
        decision = staging / "decision"
        return decision.exists() and fence.read_decision(decision) != fence.PENDING

    async def receive(self, migration_id: str, what: str, stream) -> dict:
        """Receive the rootfs or the CRIU images as a godwit tree stream."""
        if what not in ("rootfs", "images"):
            raise NotFound(f"nothing to upload as {what!r}")
        self.request(migration_id)
        dest = self._dir(migration_id) / what
        dest.mkdir(exist_ok=True)
        try:
            stats = await receive_tree(stream, dest)
        except TransferError as exc:
            raise GodwitError(f"{what} transfer failed: {exc}") from exc
        return {"files": stats.files, "bytes": stats.bytes, "wire_bytes": stats.wire_bytes,
                "seconds": stats.seconds}

    async def restore(self, migration_id: str) -> dict:
        """Restore the container; arm the fence first so an unconfirmed copy cannot survive."""
        request = self.request(migration_id)
        staging = self._dir(migration_id)
        if (staging / "decision").exists():
            raise Conflict(f"migration {migration_id} was already restored")
        name = request["name"]
        rootfs = self._place_rootfs(request, staging)
        bundle = self.store.install_bundle(name, request["config"], rootfs)
        record = ContainerRecord(name, str(rootfs), not request.get("shared_rootfs"),
                                 time.time(), origin=request.get("source"))
        self.store.save(record)
        fence.start_watchdog(staging / "decision", float(request.get("commit_timeout", 60)),
                             self.store.runc.root, name, self.store.dir(name))
        try:
            await self._runc_restore(request, bundle, staging)
        except GodwitError as exc:
            await self._discard(staging, name)
            raise GodwitError(f"restore failed on {self.store.host}: {exc}") from exc
        return {"restored_at": time.time(), "pid": (await self.store.runc.state(name)).pid}

    def _place_rootfs(self, request: dict, staging: Path) -> Path:
        if request.get("shared_rootfs"):
            return Path(request["shared_rootfs"])
        target = self.store.dir(request["name"]) / "rootfs"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (staging / "rootfs").is_dir():
            raise GodwitError("no rootfs was received")
        (staging / "rootfs").rename(target)
        return target

    async def _runc_restore(self, request: dict, bundle: Path, staging: Path) -> None:
        name = request["name"]
        work = staging / "work"
        work.mkdir(exist_ok=True)
        await self.store.runc.restore(
            name, bundle, staging / "images", work,
            tcp_established=bool(request.get("tcp_established")),
        )
        state = await self.store.state(name)
        if not state or state.status != "running":
            raise GodwitError(f"container is {state.status if state else 'gone'} after restore")

    async def _discard(self, staging: Path, name: str) -> None:
        """Undo a restore that will not be committed."""
        if fence.decide(staging / "decision", fence.ABORTED) == fence.COMMITTED:
            raise Conflict(f"container {name} was already committed here")
        await self.store.runc.delete(name)
        self.store.forget(name)

    def commit(self, migration_id: str) -> dict:
        """The source heard the restore succeeded: keep the container for good."""
        staging = self._dir(migration_id)
        self.request(migration_id)
        decision = fence.decide(staging / "decision", fence.COMMITTED) \
            if (staging / "decision").exists() else "not restored"
        if decision != fence.COMMITTED:
            raise Conflict(f"migration {migration_id} cannot commit: {decision}")
        for leftover in ("images", "work", "rootfs"):
            shutil.rmtree(staging / leftover, ignore_errors=True)
        return {"state": fence.COMMITTED}

    async def abort(self, migration_id: str) -> dict:
        """Kill a restored copy (unless committed) and drop staged files."""
        staging = self._dir(migration_id)
        if not staging.exists():
            return {"state": "unknown"}
        request = self.request(migration_id)
        if (staging / "decision").exists():
            await self._discard(staging, request["name"])
        shutil.rmtree(staging, ignore_errors=True)
        return {"state": fence.ABORTED}

    def state(self, migration_id: str) -> dict:
        staging = self._dir(migration_id)
        if not staging.exists():
            return {"state": "unknown"}
        decision = staging / "decision"
        return {"state": fence.read_decision(decision) if decision.exists() else "prepared"}

    def sweep(self, keep_finished_s: float = 86400) -> None:
        """At agent start: drop staging areas that never reached a restore, and old ones."""
        for staging in self.root.iterdir():
            decision = staging / "decision"
            old = time.time() - staging.stat().st_mtime > keep_finished_s
            if not decision.exists() or (self._finished(staging) and old):
                shutil.rmtree(staging, ignore_errors=True)
