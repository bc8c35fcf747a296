"""Destination side of a migration: staging, receiving files, restore, commit or abort.

Everything about an incoming migration lives on disk under `<state>/incoming/<id>/`
(request.json, rootfs/, images/, work/, and its `DestinationState` in `decision`), so an
agent restart loses nothing.
Just before the source freezes, the migration is armed: the rootfs moves to its place,
the bundle is written and `runc restore` starts, held before CRIU (see
`godwit.criu_gate`), so that the freeze only waits for CRIU's own restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from godwit import faults, fence, procfs, tmpfs
from godwit.containers import ContainerRecord, ContainerStore, check_name
from godwit.criu import (
    LAZY_LOG,
    PAGE_SERVER_LOG,
    START_BEFORE_IMAGES,
    criu_has_option,
    lazy_pages_verdict,
    log_error,
    start_lazy_pages,
    start_page_server,
)
from godwit.errors import Conflict, GodwitError, NotFound
from godwit.fsio import atomic_write, replace_file
from godwit.image_config import provenance_fields
from godwit.migration.failure_logs import FailureLogs
from godwit.migration.post_copy import criu_knows_peer_name, free_port, release_port
from godwit.migration.states import DestinationState
from godwit.migration.strategies import restores_lazily, upload_rounds
from godwit.network import ContainerNet
from godwit.packet_hold import PacketHold
from godwit.protocol import (
    PAGES_WAIT_S,
    Activated,
    Armed,
    Forgotten,
    IncomingRequest,
    IncomingState,
    Prepared,
    Restored,
    Uploaded,
    convert,
    encode,
)
from godwit.qos import migration_ports
from godwit.runc import RUNC_LOG, HeldRunc
from godwit.tls import TLSFiles
from godwit.transport import ByteBudget, TransferError, TreeRules, UploadTooLarge, receive_tree

if TYPE_CHECKING:
    from godwit.cluster.migration_hooks import ClusterMigrations

log = logging.getLogger("godwit.receiver")
DeviceRule = Callable[[str, int, int], bool]
ID_CHARS = set("0123456789abcdef-")
PAGES = "pages"
FILL_AFTER_RESTORE = "fill-after-restore"  # marker: restore lazily from the received pages
LAZY_SOURCE = "lazy-page-server"  # post-copy: the source's page server named at arm
PAGE_SERVER = "page-server.json"  # pid and start time of a streamed dump's page server
LAZY_PAGES = "lazy-pages.json"  # pid and start time of the restore's lazy-pages daemon
PAGES_LANDED_TIMEOUT_S = 10.0  # the dump succeeded: its page server ends right after
REAP_WAIT_S = 1.0  # a dead CRIU helper is reaped by asyncio within a loop turn or two
TRASH = "incoming-trash"  # under the state dir: trees deleted after the reply
PLACED = "rootfs-placed"  # marker: the received rootfs moved to the container's directory
# The migration's DestinationState: written here until the restore, then the fence's
# decision (the name is the fence's; earlier agents wrote it only at the restore).
STATE = "decision"
UPLOADS = re.compile(r"rootfs|images|pre-[1-9]")
UPLOAD_MARGIN = 256 << 20  # beyond a multiple of what the source announced (rootfs syncs,
#                            images larger than the memory estimate)
FENCED_GRACE_S = 10.0  # a source asks how its migration ended until shortly after the fence


class Receiver:
    """Incoming migrations of one agent."""

    def __init__(self, store: ContainerStore, state_dir: Path,
                 tls: TLSFiles | None = None, failure_logs: FailureLogs | None = None,
                 device_rule: Callable[[], DeviceRule] | None = None,
                 keeps_setid: Callable[[], bool] | None = None) -> None:
        """`device_rule()`: which device nodes a received tree may hold, `keeps_setid()`:
        whether it keeps set-id bits and file capabilities (the admission policy's, read
        per upload); without them no device nodes, no set-id bits, no capabilities."""
        self.store = store
        self.device_rule = device_rule or (lambda: _no_devices)
        self.keeps_setid = keeps_setid or (lambda: False)
        self.budgets: dict[str, ByteBudget] = {}  # per migration: bytes its uploads may write
        self.tls = tls
        self.failure_logs = failure_logs
        self.watchers: set[asyncio.Task] = set()
        self.pages_watchers: dict[str, asyncio.Task] = {}  # per migration: its pages' outcome
        self.root = state_dir / "incoming"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.trash = state_dir / TRASH
        self.holds: dict[str, PacketHold] = {}
        self.held: dict[str, HeldRunc[int]] = {}  # armed: runc restore waiting before CRIU
        self.locks: dict[str, asyncio.Lock] = {}
        self.restoring: dict[str, asyncio.Task] = {}  # an abort cancels a restore under way
        self.active: dict[str, float] = {}  # last request or received byte, per migration
        self.cluster: ClusterMigrations | None = None  # cluster mode: etcd decides commits
        # stop-and-copy: CRIU page servers taking the dump's memory pages, and their ports
        self.page_servers: dict[str, tuple[asyncio.subprocess.Process, int]] = {}
        # lazy restores: lazy-pages daemons started at arm, and the page server each pulls
        # from (None: the pages received here)
        self.early_lazy: dict[str, tuple[asyncio.subprocess.Process, str | None]] = {}
        self.standbys: dict[str, fence.Standby] = {}  # fence watchdogs started at prepare

    def _lock(self, migration_id: str) -> asyncio.Lock:
        """Restore, commit, abort and the post-copy watcher of one migration never overlap
        (an abort arriving during a restore waits for it, then undoes it)."""
        return self.locks.setdefault(migration_id, asyncio.Lock())

    def _dir(self, migration_id: str) -> Path:
        if not migration_id or set(migration_id) - ID_CHARS:
            raise GodwitError(f"invalid migration id {migration_id!r}")
        return self.root / migration_id

    def request(self, migration_id: str) -> IncomingRequest:
        path = self._dir(migration_id) / "request.json"
        if not path.exists():
            raise NotFound(f"migration {migration_id} unknown on {self.store.host}")
        return _saved_request(path)

    async def prepare(self, request: IncomingRequest) -> Prepared:
        """Reserve the name and a staging area; check a shared rootfs is visible here;
        for a networked container, make its netns now (link down, arriving packets held)."""
        name = check_name(request.name)
        staging = self._dir(request.id)
        await faults.point("prepare")
        await self.store.departures.settled(name)  # it just left for another host
        if self.store.exists(name) or self._reserved(name):
            raise Conflict(f"container {name} already exists on {self.store.host}")
        shared = request.shared_rootfs
        if shared and not Path(shared).is_dir():
            raise GodwitError(
                f"shared rootfs {shared} is not visible on {self.store.host}; "
                "drop --shared-storage to transfer it"
            )
        if request.net:
            self.store.check_address_free(request.net)
        check_free_disk(self.root, request.upload_bytes, self.store.host)
        staging.mkdir(mode=0o700, parents=True)  # received trees: no other local user
        atomic_write(staging / "request.json", encode(request))  # config and env: 0600
        self._set_state(staging, DestinationState.PREPARED)
        try:
            if request.net:
                await asyncio.to_thread(self._prepare_network, request.id, name, request.net)
            elif request.private_netns:
                await asyncio.to_thread(self.store.networking.create_private, name)
        except GodwitError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._start_standby(request, staging)
        self.touch(request.id)
        self._watch(self._expire_idle(request.id, request.idle_timeout))
        return Prepared(id=request.id, staging=str(staging))

    def _start_standby(self, request: IncomingRequest, staging: Path) -> None:
        """Start the fence's watchdog now, so that its start is not paid in the freeze."""
        try:
            self.standbys[request.id] = fence.Standby(self._fence_order(request, staging))
        except OSError as exc:  # the restore starts one then
            log.warning("migration %s: no standby fence watchdog: %s", request.id, exc)

    def _fence_order(self, request: IncomingRequest, staging: Path) -> fence.FenceOrder:
        return fence.FenceOrder(
            staging / STATE, request.commit_timeout,
            (self.store.runc.binary, self.store.runc.root), request.name,
            self.store.dir(request.name),
            self.store.networking.netns_id if request.owns_netns else None,
            self.cluster.fence_args(self.tls, request.id) if self.cluster and self.tls else None)

    def _arm_fence(self, request: IncomingRequest, staging: Path) -> None:
        """The restore follows: the watchdog's clock starts."""
        if standby := self.standbys.pop(request.id, None):
            standby.arm()
        else:
            fence.start_watchdog(self._fence_order(request, staging))

    def touch(self, migration_id: str) -> None:
        """The source still drives this migration."""
        self.active[migration_id] = time.monotonic()

    async def _expire_idle(self, migration_id: str, limit: float) -> None:
        """A migration the source stopped driving before a restore (it gave up and could
        not tell us: a partition) must not keep its staging area, name and netns here."""
        while (idle := time.monotonic() - self.active.get(migration_id, 0.0)) < limit:
            await asyncio.sleep(limit - idle)
        self.active.pop(migration_id, None)
        async with self._lock(migration_id):
            staging = self._dir(migration_id)
            if not self._state(staging).before_restore:
                return
            request = self.request(migration_id)
            log.warning("migration %s: no word from the source for %g s, dropping %s",
                        migration_id, limit, request.name)
            await self._drop_unrestored(migration_id, request, staging)
            await asyncio.to_thread(self._drop_staging, migration_id, staging)

    def _prepare_network(self, migration_id: str, name: str, net: ContainerNet) -> None:
        self.store.networking.create(name, net, connected=False)
        try:
            self.holds[migration_id] = PacketHold(self.store.networking.netns(name)).start()
        except (OSError, subprocess.CalledProcessError) as exc:
            self.store.networking.delete(name)
            raise GodwitError(f"cannot hold packets for {name} here: {exc}") from exc

    async def activate(self, migration_id: str) -> Activated:
        """The source is frozen and isolated: take over the container's MAC and address."""
        request = self.request(migration_id)
        self.touch(migration_id)
        if not request.net:
            raise GodwitError(f"migration {migration_id} has no network to activate")
        await asyncio.to_thread(self.store.networking.connect, request.name)
        self._watch(self._expire_activation(migration_id, request.commit_timeout))
        return Activated(activated=request.name)

    async def _expire_activation(self, migration_id: str, seconds: float) -> None:
        """An activated netns answers for the container's address; if no restore follows
        in time (the source gave up and could not tell us), it must not stay up."""
        await asyncio.sleep(seconds)
        async with self._lock(migration_id):
            staging = self._dir(migration_id)
            if not self._state(staging).before_restore:
                return
            request = self.request(migration_id)
            log.warning("migration %s: no restore after activation, dropping %s's address",
                        migration_id, request.name)
            await self._drop_unrestored(migration_id, request, staging)
            await asyncio.to_thread(self._drop_staging, migration_id, staging)

    def _drop_staging(self, migration_id: str, staging: Path) -> None:
        """A migration ends here: its staging area goes; the logs of one that was not
        committed are kept first."""
        committed = self._state(staging) is DestinationState.COMMITTED
        if self.failure_logs and not committed:
            work = staging / "work"
            self.failure_logs.keep(migration_id, {
                "restore.log": work / "restore.log", LAZY_LOG: work / LAZY_LOG,
                PAGE_SERVER_LOG: work / PAGE_SERVER_LOG,
                "runc-restore.log": work / RUNC_LOG})
        tmpfs.release_all_under(staging)  # else the rmtree below leaves its mounts
        shutil.rmtree(staging, ignore_errors=True)
        self.budgets.pop(migration_id, None)

    async def _drop_when_fenced(self, migration_id: str, seconds: float) -> None:
        """A fenced migration's staging area goes once its source has stopped asking how
        it ended (it could not reach us to abort it: a partition)."""
        await asyncio.sleep(seconds)
        async with self._lock(migration_id):
            staging = self._dir(migration_id)
            if self._state(staging) is DestinationState.FENCED:
                await asyncio.to_thread(self._drop_staging, migration_id, staging)

    async def forget(self, migration_id: str) -> Forgotten:
        """The source settled a migration that ended here (it deleted its copy after the
        commit): the small record kept for its questions goes too."""
        async with self._lock(migration_id):
            staging = self._dir(migration_id)
            if staging.exists() and not self._state(staging).finished:
                raise Conflict(f"migration {migration_id} has not ended on {self.store.host}")
            await asyncio.to_thread(self._drop_staging, migration_id, staging)
        self.locks.pop(migration_id, None)
        return Forgotten(forgotten=migration_id)

    def _reserved(self, name: str) -> bool:
        for path in self.root.glob("*/request.json"):
            if _saved_request(path).name == name and not self._state(path.parent).finished:
                return True
        return False

    @staticmethod
    def _state(staging: Path) -> DestinationState:
        """Where the migration staged in `staging` stands."""
        if not staging.exists():
            return DestinationState.UNKNOWN
        if not (staging / STATE).exists():  # staged by an earlier agent, not restored
            return DestinationState.PREPARED
        return fence.read_decision(staging / STATE)

    def _refuse_restored(self, migration_id: str, staging: Path) -> None:
        if self._state(staging).restored:
            raise Conflict(f"migration {migration_id} was already restored")

    @staticmethod
    def _set_state(staging: Path, state: DestinationState) -> None:
        """Before the restore only: from then on the fence decides (under its lock)."""
        atomic_write(staging / STATE, state.value, 0o644)

    async def receive(self, migration_id: str, what: str, stream) -> Uploaded:
        """Receive the rootfs or the CRIU images as a godwit tree stream."""
        if not UPLOADS.fullmatch(what):
            raise NotFound(f"nothing to upload as {what!r}")
        request = self.request(migration_id)
        staging = self._dir(migration_id)
        placed = what == "rootfs" and (staging / PLACED).exists()
        dest = self._placed_rootfs(request) if placed else staging / what
        dest.mkdir(exist_ok=True)
        self.touch(migration_id)
        await faults.point("rootfs" if what == "rootfs" else "images")
        rules = TreeRules(budget=self._budget(migration_id, request),
                          keep_setid=self.keeps_setid(), device_allowed=self.device_rule())
        try:
            stats = await receive_tree(stream, dest, rules=rules,
                                       on_progress=lambda _: self.touch(migration_id))
        except UploadTooLarge as exc:
            await self.abort(migration_id)
            raise GodwitError(f"{what} upload cut off: {exc}; migration {migration_id} "
                              f"aborted on {self.store.host}") from exc
        except TransferError as exc:
            raise GodwitError(f"{what} transfer failed: {exc}") from exc
        return Uploaded(files=stats.files, bytes=stats.bytes, wire_bytes=stats.wire_bytes,
                        seconds=stats.seconds)

    def _budget(self, migration_id: str, request: IncomingRequest) -> ByteBudget:
        """What all uploads of a migration may write: twice the announced bytes (the rootfs
        goes twice at most: its copy and its sync), once more per pre-copy round (each
        pre-dump holds at most the memory), plus UPLOAD_MARGIN; after an agent restart,
        the whole of it again."""
        if migration_id not in self.budgets:
            times = 2 + upload_rounds(request.strategy)
            self.budgets[migration_id] = ByteBudget(times * request.upload_bytes
                                                    + UPLOAD_MARGIN)
        return self.budgets[migration_id]

    async def arm(self, migration_id: str, descriptors: list[str],
                  page_server_on: tuple[str, int] | None = None,
                  source_address: str | None = None,
                  fill_after_restore: bool = False,
                  lazy_page_server: str | None = None,
                  images_in_memory: bool = False) -> Armed:
        """The source is about to freeze: place the rootfs, write the bundle and start
        `runc restore`, held before CRIU. `descriptors` is runc's descriptors.json of the
        dump (the container's stdio), which runc reads before CRIU starts. With
        `page_server_on` (the agent's own address and port, as the source reached it), a
        CRIU page server listens there, on a port of the migration block, for the dump's
        memory pages from `source_address`. With `fill_after_restore` the restore is lazy,
        its memory filled from the received pages once the container runs; with
        `lazy_page_server` (post-copy), from that page server of the source. Either way
        the lazy-pages daemon starts now, when this CRIU can (`_start_lazy_early`). With
        `images_in_memory` the images dir is a tmpfs (`_images_dir`)."""
        self.touch(migration_id)
        await faults.point("arm")
        async with self._lock(migration_id):
            request = self.request(migration_id)
            staging = self._dir(migration_id)
            if migration_id in self.held or self._state(staging).restored:
                raise Conflict(f"migration {migration_id} is already armed or restored")
            bundle = self._install(request, staging)
            images = self._images_dir(staging, in_memory=images_in_memory)
            (images / "descriptors.json").write_text(json.dumps(descriptors))
            if fill_after_restore:
                (staging / FILL_AFTER_RESTORE).touch()
            if lazy_page_server:
                (staging / LAZY_SOURCE).write_text(lazy_page_server)
            lazy = restores_lazily(request.strategy) or fill_after_restore
            self.held[migration_id] = await self._runc_restore(
                request, bundle, staging, lazy=lazy, hold=True)
            page_server = await self._start_page_server(
                migration_id, staging, page_server_on, source_address) \
                if page_server_on else None
            if fill_after_restore or lazy_page_server:
                await self._start_lazy_early(migration_id, staging, lazy_page_server)
            self._set_state(staging, DestinationState.ARMED)
        self._watch(self._expire_hold(migration_id, request.commit_timeout))
        return Armed(armed=request.name, page_server=page_server)

    @staticmethod
    def _images_dir(staging: Path, in_memory: bool) -> Path:
        """The images dir; `in_memory`, a tmpfs (on disk if it cannot be mounted), let go
        with the staging area (`_drop_staging`) or at the commit (`_throw_away`)."""
        images = staging / "images"
        images.mkdir(exist_ok=True)
        if in_memory and not os.path.ismount(images):
            try:
                tmpfs.mount_tmpfs(images)
            except OSError as exc:
                log.warning("images of %s kept on disk: %s", staging.name, exc)
        return images

    async def _start_page_server(self, migration_id: str, staging: Path,
                                 agent: tuple[str, int], source: str | None) -> str:
        """Start the page server a streamed dump sends its pages to; returns address:port."""
        address = agent[0]
        port = free_port(address, migration_ports(agent[1]))
        (staging / "work").mkdir(exist_ok=True)
        peer = source if criu_knows_peer_name() else None
        try:
            proc = await start_page_server(staging / "images", staging / "work", address,
                                           port, self.tls, peer)
        except GodwitError:
            release_port(port)
            raise
        self.page_servers[migration_id] = (proc, port)
        _save_process(staging / PAGE_SERVER, proc.pid)
        return f"{address}:{port}"

    async def _pages_landed(self, migration_id: str, staging: Path) -> int:
        """A streamed dump's pages are all in the images dir: its page server ended well
        (it ends once the dump flushed its last pages and closed; the dump only succeeds
        once the server acknowledged that flush, and TLS guarded each byte on the way).
        Returns the bytes of pages it wrote."""
        entry = self.page_servers.pop(migration_id, None)
        if not entry:
            return 0
        proc, port = entry
        try:
            async with asyncio.timeout(PAGES_LANDED_TIMEOUT_S):
                code = await proc.wait()
        except TimeoutError:
            code = None
        finally:
            self._stop_page_server(proc, port)
        if code != 0:
            cause = log_error(staging / "work", PAGE_SERVER_LOG) or \
                ("it did not end" if code is None else f"exit code {code}")
            raise GodwitError(f"memory pages did not all arrive: page server: {cause}")
        return sum(path.stat().st_size for path in (staging / "images").glob("pages-*.img"))

    def _stop_page_server(self, proc: asyncio.subprocess.Process, port: int) -> None:
        _kill_if_running(proc)
        release_port(port)

    def _drop_page_server(self, migration_id: str) -> None:
        """Rollback: a page server still waiting for a dump goes."""
        if entry := self.page_servers.pop(migration_id, None):
            self._stop_page_server(*entry)

    async def _expire_hold(self, migration_id: str, seconds: float) -> None:
        """A held restore the source never lets through (it gave up, or its images take
        long) is called off, with a lazy-pages daemon started at arm; a later restore then
        runs without the head start."""
        await asyncio.sleep(seconds)
        async with self._lock(migration_id):
            held = self.held.pop(migration_id, None)
            self._stop_early_lazy(migration_id)
        if held:
            await held.call_off()

    async def call_off_held(self) -> None:
        """Agent shutdown: no held restore outlives it."""
        held, self.held = list(self.held.values()), {}
        for one in held:
            await one.call_off()
        for migration_id in list(self.page_servers):
            self._drop_page_server(migration_id)
        for migration_id in list(self.early_lazy):
            self._stop_early_lazy(migration_id)
        for standby in self.standbys.values():
            standby.close()
        self.standbys.clear()

    def _install(self, request: IncomingRequest, staging: Path) -> Path:
        """Put the rootfs in place (once) and write this host's bundle; returns it."""
        shared = request.shared_rootfs
        if shared:
            rootfs = Path(shared)
        elif (staging / PLACED).exists():
            rootfs = self._placed_rootfs(request)
        else:
            rootfs = self._placed_rootfs(request)
            rootfs.parent.mkdir(parents=True, exist_ok=True)
            if not (staging / "rootfs").is_dir():
                raise GodwitError("no rootfs was received")
            (staging / "rootfs").rename(rootfs)
            (staging / PLACED).touch()
        return self.store.install_bundle(request.name, request.config, rootfs,
                                         request.owns_netns)

    def _placed_rootfs(self, request: IncomingRequest) -> Path:
        return self.store.dir(request.name) / "rootfs"

    async def restore(self, migration_id: str, page_server: str | None = None) -> Restored:
        """Restore the container; arm the fence first so an unconfirmed copy cannot survive.
        With `page_server` (post-copy) memory comes later, pulled from the source."""
        async with self._lock(migration_id):
            task = asyncio.current_task()
            assert task
            self.restoring[migration_id] = task
            try:
                return await self._restore(migration_id, page_server)
            finally:
                self.restoring.pop(migration_id, None)

    async def restore_with_images(self, migration_id: str, stream) -> Restored:
        """Protocol 2.6: receive the dump's images, then restore at once; a post-copy
        restore pulls from the page server the source named at arm. A restored migration
        takes no images (its lazy-pages daemon may still read them)."""
        staging = self._dir(migration_id)
        self._refuse_restored(migration_id, staging)
        await self.receive(migration_id, "images", stream)
        lazy_source = staging / LAZY_SOURCE
        page_server = lazy_source.read_text() if lazy_source.exists() else None
        return await self.restore(migration_id, page_server)

    async def _restore(self, migration_id: str, page_server: str | None) -> Restored:
        request = self.request(migration_id)
        staging = self._dir(migration_id)
        self._refuse_restored(migration_id, staging)
        page_bytes = await self._pages_landed(migration_id, staging)
        name = request.name
        held = self.held.pop(migration_id, None)
        bundle = self.store.bundle_dir(name) if held else self._install(request, staging)
        rootfs = Path(request.shared_rootfs or self._placed_rootfs(request))
        record = ContainerRecord(name, str(rootfs), not request.shared_rootfs,
                                 time.time(), origin=request.source,
                                 net=request.net.to_json() if request.net else None,
                                 private_netns=request.private_netns,
                                 **provenance_fields(request.config))
        self.store.save(record)
        self._arm_fence(request, staging)
        self._watch(self._drop_when_fenced(
            migration_id, request.commit_timeout + FENCED_GRACE_S))
        lazy = await self._lazy_pages_for(migration_id, staging, page_server)
        try:
            pid = await self._held_or_new_restore(held, request, bundle, staging,
                                                  lazy=lazy is not None)
        except GodwitError as exc:
            await _reap_if_dead(lazy)
            detail = restore_failure(staging / "work", exc, lazy)
            _kill_if_running(lazy)
            await self._discard(migration_id, staging, name, record.owns_netns)
            raise GodwitError(f"restore failed on {self.store.host}: {detail}") from exc
        except asyncio.CancelledError:  # aborted under way (the source's freeze deadline)
            if held:
                await held.call_off()
            _kill_if_running(lazy)
            await self._discard(migration_id, staging, name, record.owns_netns)
            raise
        if lazy:
            self._watch_pages(migration_id, lazy, name, record.owns_netns)
        held_packets = await self._release_packets(migration_id)
        return Restored(restored_at=time.time(), held_packets=held_packets, pid=pid,
                        page_bytes=page_bytes)

    async def _release_packets(self, migration_id: str) -> int:
        hold = self.holds.pop(migration_id, None)
        return await asyncio.to_thread(hold.release) if hold else 0

    async def _start_lazy_pages(self, staging: Path, page_server: str | None, *,
                                before_images: bool = False):
        """The daemon that fills the restored memory: from the source's page server
        (post-copy), or with `page_server` None from the pages received here."""
        (staging / "work").mkdir(exist_ok=True)
        daemon = await start_lazy_pages(staging / "images", staging / "work", page_server,
                                        self.tls, before_images=before_images)
        _save_process(staging / LAZY_PAGES, daemon.pid)  # in its own session: it outlives us
        return daemon

    async def _start_lazy_early(self, migration_id: str, staging: Path,
                                page_server: str | None) -> None:
        """Start the lazy-pages daemon at arm, so that its start (~10 ms, a CRIU process
        reading its images) is not paid in the freeze: a CRIU with START_BEFORE_IMAGES
        reads them, and reaches the page server, once the restore connects. Without it, or
        if it does not start, the restore starts one as before."""
        if not criu_has_option(START_BEFORE_IMAGES):
            return
        try:
            daemon = await self._start_lazy_pages(staging, page_server, before_images=True)
        except GodwitError as exc:
            log.warning("lazy-pages daemon not started at arm, the restore will: %s", exc)
            return
        self.early_lazy[migration_id] = (daemon, page_server)

    def _stop_early_lazy(self, migration_id: str) -> None:
        """A lazy-pages daemon started at arm that no restore will use goes."""
        daemon, _ = self.early_lazy.pop(migration_id, (None, None))
        _kill_if_running(daemon)

    async def _lazy_pages_for(self, migration_id: str, staging: Path,
                              page_server: str | None):
        """The lazy-pages daemon of this restore (None: the restore is whole): the one
        started at arm if it still waits and pulls from `page_server`, else a new one."""
        daemon, pulls_from = self.early_lazy.pop(migration_id, (None, None))
        if not (page_server or (staging / FILL_AFTER_RESTORE).exists()):
            _kill_if_running(daemon)
            return None
        if daemon is None or daemon.returncode is not None or pulls_from != page_server:
            _kill_if_running(daemon)
            daemon = await self._start_lazy_pages(staging, page_server)
        _set_pages(staging, "transferring")
        return daemon

    def _watch_pages(self, migration_id: str, daemon, name: str, networked: bool) -> None:
        task = self._watch(self._pages_outcome(migration_id, daemon, name, networked))
        self.pages_watchers[migration_id] = task
        task.add_done_callback(lambda _: self.pages_watchers.pop(migration_id, None))

    def _watch(self, coro) -> asyncio.Task:
        """Run a background check, keeping a reference so it is not garbage-collected."""
        task = asyncio.create_task(coro)
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)
        return task

    async def _pages_outcome(self, migration_id: str, daemon, name: str,
                             networked: bool) -> None:
        """When the lazy-pages daemon ends, either every page arrived or this copy is
        broken (it would run on zero-filled memory) and is killed at once."""
        code = await daemon.wait()
        staging = self._dir(migration_id)
        ok, detail = lazy_pages_verdict(staging / "work")
        state = await self.store.state(name)
        if code == 0 and ok and state and state.status == "running":
            _set_pages(staging, f"complete: {detail}")
            return
        _set_pages(staging, f"failed: {detail}")
        async with self._lock(migration_id):
            with contextlib.suppress(GodwitError):
                await self._discard(migration_id, staging, name, networked)

    async def _held_or_new_restore(self, held: HeldRunc[int] | None, request: IncomingRequest,
                                   bundle: Path, staging: Path, lazy: bool) -> int:
        """Let the armed restore proceed, or run one now; returns the pid of the container's
        init, which must be alive (read from /proc: a `runc state` would add a process start
        to the freeze)."""
        if held:
            held.release()
            await faults.point("restore", held.proc.pid)
            pid = await held.outcome()
        else:
            await faults.point("restore")
            pid = await self._runc_restore(request, bundle, staging, lazy=lazy)
        if not procfs.alive(pid):
            raise GodwitError("the container exited right after its restore")
        return pid

    async def _runc_restore(self, request: IncomingRequest, bundle: Path, staging: Path, *,
                            lazy: bool, hold: bool = False):
        """runc restore of the staged images (dumped with their established TCP connections,
        see source.dump_options); with `hold`, a HeldRunc waiting before CRIU."""
        work = staging / "work"
        work.mkdir(exist_ok=True)
        restore = self.store.runc.hold_restore if hold else self.store.runc.restore
        return await restore(request.name, bundle, staging / "images", work,
                             tcp_established=True, lazy_pages=lazy)

    async def _discard(self, migration_id: str, staging: Path, name: str,
                       networked: bool) -> None:
        """Undo a restore that will not be committed: isolate first, then kill."""
        if fence.decide(staging / STATE, DestinationState.ABORTED) is DestinationState.COMMITTED:
            raise Conflict(f"container {name} was already committed here")
        await self._drop_network(migration_id, name, networked)
        await self.store.runc.delete(name)
        self.store.forget(name)

    async def _drop_unrestored(self, migration_id: str, request: IncomingRequest,
                               staging: Path) -> None:
        """Undo what came before a restore, or of a restore killed half way: a held runc
        restore and what runc left, a placed rootfs, the netns."""
        if held := self.held.pop(migration_id, None):
            await held.call_off()
        if standby := self.standbys.pop(migration_id, None):
            standby.close()
        self._drop_page_server(migration_id)
        self._stop_early_lazy(migration_id)
        await self.store.runc.delete(request.name)
        await self._drop_network(migration_id, request.name, request.owns_netns)
        if (staging / PLACED).exists():
            self.store.forget(request.name)

    async def _drop_network(self, migration_id: str, name: str, networked: bool) -> None:
        """Isolate, drop held packets (never let a peer reach an empty netns), delete.
        `networked`: the container has a godwit netns here. Idempotent: pieces already
        gone are fine."""
        hold = self.holds.pop(migration_id, None)
        if hold:
            hold.discard()
        if not networked:
            return
        with contextlib.suppress(GodwitError):  # no veth left: nothing to isolate
            await asyncio.to_thread(self.store.networking.isolate, name)
        await asyncio.to_thread(self.store.networking.delete, name)

    async def commit(self, migration_id: str) -> IncomingState:
        """The source heard the restore succeeded: keep the container for good, if it still
        runs (committing a dead copy would let the source delete the only good one)."""
        await faults.point("commit")
        async with self._lock(migration_id):
            staging = self._dir(migration_id)
            request = self.request(migration_id)
            pages = self._pages(staging)
            if pages is not None and not pages.startswith("complete"):
                raise Conflict(f"migration {migration_id} cannot commit: memory pages {pages}")
            state = await self.store.state(request.name)
            current = self._state(staging)
            if current is DestinationState.PENDING and (not state or state.status != "running"):
                raise Conflict(f"migration {migration_id} cannot commit: the container "
                               f"is {state.status if state else 'gone'} here")
            if self.cluster and current.restored:
                await self.cluster.commit(migration_id, request.name, request.source)
            decision = fence.decide(staging / STATE, DestinationState.COMMITTED) \
                if current.restored else "not restored"
            if decision is not DestinationState.COMMITTED:
                raise Conflict(f"migration {migration_id} cannot commit: {decision}")
            await faults.point("commit-done")
        for leftover in ("images", "rootfs", "work", *(p.name for p in staging.glob("pre-*"))):
            self._throw_away(staging / leftover)
        return IncomingState(state=DestinationState.COMMITTED)

    def _throw_away(self, tree: Path) -> None:
        """Move a tree out of the staging area now and delete it in the background: the
        commit's answer does not wait for a memory image's page cache to go (~70 ms per
        GiB). What an agent's stop leaves there goes with its next sweep."""
        with contextlib.suppress(OSError):  # a mount cannot be moved: its memory goes now
            tmpfs.release(tree)
        self.trash.mkdir(mode=0o700, exist_ok=True)
        target = self.trash / uuid.uuid4().hex
        try:
            tree.rename(target)
        except FileNotFoundError:
            return
        self._watch(asyncio.to_thread(shutil.rmtree, target, ignore_errors=True))

    async def abort(self, migration_id: str) -> IncomingState:
        """Kill a restored copy (unless committed) and drop staged files; a restore under
        way is cancelled first (its runc and CRIU killed). Idempotent."""
        if restoring := self.restoring.get(migration_id):
            restoring.cancel()
        async with self._lock(migration_id):
            staging = self._dir(migration_id)
            if not staging.exists():
                return IncomingState(state=DestinationState.UNKNOWN)
            request = self.request(migration_id)
            name, networked = request.name, request.owns_netns
            if self._state(staging).restored:
                await self._discard(migration_id, staging, name, networked)
            else:
                await self._drop_unrestored(migration_id, request, staging)
            await asyncio.to_thread(self._drop_staging, migration_id, staging)
        self.locks.pop(migration_id, None)
        return IncomingState(state=DestinationState.ABORTED)

    def state(self, migration_id: str) -> IncomingState:
        staging = self._dir(migration_id)
        return IncomingState(state=self._state(staging), pages=self._pages(staging))

    async def state_once_filled(self, migration_id: str,
                                wait: float = PAGES_WAIT_S) -> IncomingState:
        """`state`, once the restored copy's memory is complete or its fill failed (the
        outcome settled), or after `wait` seconds: the source asks again."""
        if watcher := self.pages_watchers.get(migration_id):
            await asyncio.wait({watcher}, timeout=wait)
        return self.state(migration_id)

    @staticmethod
    def _pages(staging: Path) -> str | None:
        """Post-copy only: transferring, complete, or failed: <why>."""
        path = staging / PAGES
        return path.read_text() if path.exists() else None

    def sweep(self, keep_finished_s: float = 86400) -> None:
        """At agent start: drop staging areas that never reached a restore or were fenced
        or aborted, and old committed ones (a source may still ask about those)."""
        shutil.rmtree(self.trash, ignore_errors=True)
        for staging in self.root.iterdir():
            state = self._state(staging)
            old = time.time() - staging.stat().st_mtime > keep_finished_s
            ended = state in (DestinationState.FENCED, DestinationState.ABORTED)
            if state.before_restore or ended or (state.finished and old):
                saved = staging / "request.json"
                request = _saved_request(saved) if saved.exists() else None
                if request and request.owns_netns and state.before_restore:
                    self.store.networking.delete(request.name)
                if request and (staging / PLACED).exists() and state.before_restore:
                    self.store.forget(request.name)
                _kill_orphan(staging / PAGE_SERVER)
                _kill_orphan(staging / LAZY_PAGES)
                self._drop_staging(staging.name, staging)


def restore_failure(work: Path, exc: GodwitError,
                    lazy: asyncio.subprocess.Process | None) -> str:
    """Why a restore failed: its own log's root cause. The lazy-pages daemon's error is
    added when the restore names no cause or one of lazy pages (the daemon ended first);
    a daemon that ended because the restore died only echoes it ("recv_fd error")."""
    cause = log_error(work, "restore.log")
    detail = cause or str(exc)
    if lazy and lazy.returncode not in (None, 0) and (
            cause is None or "lazy" in cause or "uffd" in cause):
        detail += f" (criu lazy-pages: {log_error(work, LAZY_LOG) or f'exit {lazy.returncode}'})"
    return detail


async def _reap_if_dead(proc: asyncio.subprocess.Process | None) -> None:
    """Collect the exit of a CRIU process that has died but that asyncio has not reaped
    yet, so that a failure report sees why it ended (a killed lazy-pages daemon is what
    made the restored copy exit)."""
    if proc and proc.returncode is None and not procfs.alive(proc.pid):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), REAP_WAIT_S)


def _kill_if_running(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL a CRIU process this agent started (a page server, a lazy-pages daemon) that
    has not ended; its exit is collected by asyncio."""
    if proc and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def _set_pages(staging: Path, status: str) -> None:
    """Post-copy's page status (see Receiver._pages), replaced whole: a reader never
    finds it empty."""
    replace_file(staging / PAGES, status, 0o644)


def _save_process(path: Path, pid: int) -> None:
    replace_file(path, json.dumps({"pid": pid, "start": procfs.start_time(pid)}))


def _kill_orphan(saved: Path) -> None:
    """A page server (or lazy-pages daemon) a previous agent started for a migration that
    no dump or restore will finish."""
    try:
        started = json.loads(saved.read_text())
        pid, start = int(started["pid"]), started["start"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):  # torn by an older agent killed mid-write
        log.warning("ignoring unreadable %s", saved)
        return
    if procfs.start_time(pid) == start:  # not a reused pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _no_devices(kind: str, major: int, minor: int) -> bool:
    return False


def check_free_disk(root: Path, announced: int, host: str) -> None:
    """Refuse a migration whose announced uploads do not fit on this host's disk."""
    free = shutil.disk_usage(root).free
    if announced > free:
        raise GodwitError(f"not enough disk on {host}: the source announces {announced} "
                          f"bytes, {free} free under {root}")


def _saved_request(path: Path) -> IncomingRequest:
    """A request.json this agent saved; the fields of an older godwit that are no longer
    sent (tcp_established) are dropped, one saved before uploads were announced (protocol
    1) gets the default budget only (upload_bytes 0)."""
    raw = {"upload_bytes": 0, **json.loads(path.read_text())}
    known = set(IncomingRequest.__struct_fields__)
    return convert({k: v for k, v in raw.items() if k in known}, IncomingRequest,
                   f"saved {path.name}")
