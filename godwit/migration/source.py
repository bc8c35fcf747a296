"""Source side of a migration: the steps every strategy shares, and the safety net.

The container is frozen (its cgroup, as `runc pause` does) and dumped with
`--leave-running`, so the source keeps a paused copy until the destination has committed.
Just before the freeze both sides are armed: `runc checkpoint` here and `runc restore`
there start and wait right before CRIU (see `godwit.criu_gate`), so the freeze holds only
CRIU's own work. On any failure the destination copy is aborted (or left to its fence
watchdog) and the source copy is resumed: exactly one copy runs afterwards. Only when a
commit was sent and its outcome cannot be learnt does the source stay paused and the
migration end "in-doubt".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from godwit import faults, procfs
from godwit.api import DEFAULT_PORT, AgentClient, AgentUnreachable
from godwit.cluster.migration_hooks import COMMITTED, SourceGuard
from godwit.cluster.store import ClusterUnavailable
from godwit.containers import ContainerStore
from godwit.criu import log_error, tls_config_lines
from godwit.errors import GodwitError
from godwit.migration import MigrationOptions, default_max_freeze
from godwit.migration.failure_logs import FailureLogs
from godwit.migration.journal import Journal, Journals
from godwit.migration.report import EventStream
from godwit.migration.states import DestinationState, Result, Stage
from godwit.migration.write_back import write_back_mapped_files, write_back_written_files
from godwit.netns_carry import check_own_netns
from godwit.network import ContainerNet, wants_own_netns
from godwit.preflight import Need, check_file_locks, refusal, run_checks, verdict
from godwit.protocol import Armed, HostInfo, IncomingRequest, Restored, RestoreRequest
from godwit.runc import RUNC_LOG, CheckpointOptions, HeldRunc, Runc
from godwit.tls import TLSFiles
from godwit.transport import (
    BLAKE3,
    SHA256,
    Manifest,
    TreePlan,
    TreeStream,
    changes_since,
    plan_tree,
    scan_tree,
    send_tree,
)

RESTARTED = "the source agent restarted during the migration"
FENCE_MARGIN_S = 3.0
# After the freeze deadline the container runs again within this margin: CRIU/runc are
# killed, the destination's abort is given at most api.ABORT_TIMEOUT_S, the source thaws.
FREEZE_MARGIN_S = 5.0
PROGRESS_INTERVAL_S = 0.1
VERIFY_TIMEOUT_S = 10.0
PAGES_POLL_S = 0.05  # a destination older than 2.4 is asked this often (none more often)
SETTLE_S = 0.2  # the restored copy must still run this long after its restore


def incoming_request(store: ContainerStore, name: str, options: MigrationOptions, *,
                     migration_id: str, source: str, strategy: str,
                     upload_bytes: int) -> IncomingRequest:
    """What the source asks the destination to prepare for container ``name``."""
    record = store.record(name)
    max_freeze = options.max_freeze or default_max_freeze(store.memory_usage(name))
    return IncomingRequest(
        id=migration_id,
        name=name,
        source=source,
        config=store.config(name),
        shared_rootfs=record.rootfs if options.shared_storage else None,
        commit_timeout=options.commit_timeout,
        idle_timeout=options.progress_timeout + max_freeze,
        strategy=strategy,
        net=ContainerNet.from_json(record.net) if record.net else None,
        private_netns=record.private_netns,
        upload_bytes=upload_bytes,
    )


def protocol_at_least(version: str, wanted: tuple[int, int]) -> bool:
    """Does a peer speaking protocol `version` (major.minor) know `wanted`'s features?"""
    major, _, minor = version.partition(".")
    return (int(major), int(minor or 0)) >= wanted


def migration_needs(store: ContainerStore, name: str, shared: bool) -> tuple[int, int]:
    """(memory, disk) bytes a destination needs to take this container."""
    memory = store.memory_usage(name)
    if shared:
        return memory, memory
    rootfs = scan_tree(Path(store.record(name).rootfs))
    return memory, memory + sum(m.size for m in rootfs.values() if m.type == "file")


class InDoubt(GodwitError):
    """A commit was sent but whether the destination took it is unknown."""


@dataclass
class SourceContext:
    """What a strategy needs from the source agent."""

    store: ContainerStore
    dest: AgentClient
    journals: Journals
    work_dir: Path
    local_info: HostInfo
    tls: TLSFiles | None = None
    agent_port: int = DEFAULT_PORT
    failure_logs: FailureLogs | None = None
    cluster: SourceGuard | None = None  # cluster mode: the lock, and etcd decides commits
    dest_info: HostInfo | None = None  # the destination's /v1/info, when asked just before


class SourceMigration:
    """Stop-and-copy, and the base of the other strategies.

    A strategy is a subclass listed in `strategies.REGISTRY`. It declares:
      strategy        its name (`--strategy`, reports, journals)
      needs           the host features it needs (`preflight.Need`: a CRIU capability or a
                      runc feature, on the source or the destination); pre-flight refuses
                      a migration that lacks one, and an explicit request is refused at
                      once when the source itself lacks a CRIU one
      lazy_restore    the destination restores before the memory arrives (its runc restore
                      runs with --lazy-pages)
      upload_rounds   uploads of the memory before the final dump (the destination's byte
                      budget grows by one announced size per round)
      auto_rank, auto_min_memory, auto_fits()
                      whether and when `--strategy auto` picks it (lowest rank first)
      stream_pages    the dump sends its pages to a page server on the destination (so
                      they never land here); off where pages stay or are pulled
      fill_after_restore
                      once every page is on the destination, it restores lazily and
                      fills the memory from them after the restore (out of the freeze);
                      off where the images have a parent (pre-copy) or the pages come
                      later (post-copy)
    and overrides the hooks it needs (each does the stop-and-copy thing here):
      before_freeze()     work while the container still runs (pre-copy's rounds)
      hold_dump()         start the dump's runc, held before CRIU (post-copy: lazily,
                          with a page server)
      call_off_dump()     rollback: a held dump never starts
      dump_options()      the checkpoint's options (pre-copy: the parent pre-dump)
      dump()              let the held dump run; save what a restarted agent needs in
                          `self.journal.extra`
      fence_timeout       seconds from the restore until the destination fences
      restore_request()   what the destination's restore needs beyond the staged files
      verify()            the restored copy is complete and running
      release_source()    rollback: stop what still holds the source before it resumes
      cleanup_source()    the destination runs it for good: delete the source copy
    A new strategy is then one module (the subclass) plus its entry in `REGISTRY`, and
    its tests.

    The migration's `stage` (`Stage`) is journaled before each step that changes what
    runs where, so `recover` can settle it after an agent restart.
    """

    strategy: ClassVar[str] = "stop-and-copy"
    needs: ClassVar[tuple[Need, ...]] = ()
    lazy_restore: ClassVar[bool] = False
    upload_rounds: ClassVar[int] = 0
    auto_rank: ClassVar[int | None] = None  # None: only when asked for, or as the default
    auto_min_memory: ClassVar[int] = 0
    # The dump streams its memory pages straight to a CRIU page server on the destination
    # (a destination of protocol 2.1 or later): they are never written here nor read back.
    stream_pages: ClassVar[bool] = True
    # The restore copies the memory after the container resumes, from the pages already on
    # the destination (a destination of protocol 2.3 or later that restores lazily); the
    # source stays frozen until every page is in, so the guarantee is unchanged.
    fill_after_restore: ClassVar[bool] = True

    def __init__(self, ctx: SourceContext, name: str, options: MigrationOptions,
                 events: EventStream) -> None:
        self.ctx, self.name, self.options, self.events = ctx, name, options, events
        self.report = events.report
        self.record = ctx.store.record(name)
        self.images = ctx.work_dir / "images"
        self.stage = Stage.NEW  # what is known to have happened (the journal: may have)
        self.restore_sent_at: float | None = None
        self.restored_at: float | None = None  # monotonic, when the restore answered
        self.manifest: Manifest | None = None
        self.journal = Journal(self.report.id, name, self.strategy, options.to_json())
        self.held_dump: HeldRunc | None = None
        self.dest_info: HostInfo | None = None  # the destination's /v1/info, at prepare
        self.fills_after_restore = False  # decided at arm: see `fill_after_restore`
        self.pages_to: str | None = None  # the destination's page server, when streamed
        self.upload_bytes = 0  # the pre-flight's estimate of what goes to the destination

    @classmethod
    def auto_fits(cls, source: dict, dest: dict) -> bool:
        """Can auto pick it between hosts of these CRIU capabilities?"""
        return all((source if need.side == "source" else dest).get(need.feature)
                   for need in cls.needs if not need.runc)

    @property
    def prepared(self) -> bool:
        return self.stage >= Stage.PREPARED

    @property
    def frozen(self) -> bool:
        return self.stage >= Stage.FROZEN

    @property
    def isolated(self) -> bool:
        return self.stage >= Stage.ISOLATED and bool(self.record.net)

    @property
    def restored(self) -> bool:
        """The destination answered the restore: its copy ran."""
        return self.stage >= Stage.RESTORED

    @property
    def runc(self) -> Runc:
        return self.ctx.store.runc

    @property
    def shared(self) -> bool:
        return self.options.shared_storage

    async def execute(self) -> None:
        """Run the migration to an outcome; never raises."""
        await self.run_to_outcome(self.migrate())

    async def recover(self, journal: Journal) -> None:
        """After a source agent restart: settle a migration the old agent left half way."""
        self.journal = journal
        self.pages_to = journal.extra.get("pages_to")
        self.stage = journal.stage  # what may have happened is taken as done
        if self.stage >= Stage.RESTORE_SENT:
            self.restore_sent_at = time.monotonic()  # wait for a fence as if just sent
        await self.run_to_outcome(self.settle_after_restart())

    async def settle_after_restart(self) -> None:
        """Keep a commit the destination took; otherwise roll back."""
        if self.stage >= Stage.COMMIT_SENT:
            state = await self.destination_state()
            if state is None and self.ctx.cluster:  # etcd's decision, written if none
                decided = await self.ctx.cluster.decision()
                state = DestinationState(decided) if decided else None
            if state is None:
                raise InDoubt(RESTARTED)
            if state is DestinationState.COMMITTED:
                await self.cleanup_source()
                return
        raise GodwitError(RESTARTED)

    async def run_to_outcome(self, steps: Awaitable[None]) -> None:
        """Run `steps` and report how the migration ended: any failure ends in a rollback,
        an unknown commit in doubt. Never raises. The caller closes the event stream."""
        try:
            await steps
            self.report.result = Result.OK
            self.report.outcome = f"running on {self.report.destination}"
        except InDoubt as exc:
            self.report.result, self.report.error = Result.IN_DOUBT, str(exc)
            self.report.outcome = (f"paused on {self.report.source}, destination unreachable: "
                                   f"check {self.report.destination}, then `godwit resume "
                                   f"{self.name}` or `godwit rm {self.name}`")
        except Exception as exc:  # every failure ends in a rollback, whatever raised it
            self.report.error = _one_line(exc)
            self.report.outcome = await self.rollback()
            if self.report.result == Result.RUNNING:
                self.report.result = Result.FAILED
        finally:
            self.report.finished_at = time.time()
            self.settle_work_dir()

    def settle_work_dir(self) -> None:
        """Keep the logs of a migration that did not succeed; once settled, the journal,
        images and logs in the work dir go."""
        if self.report.result != Result.OK and self.ctx.failure_logs:
            work = self.dump_options().work_path
            self.ctx.failure_logs.keep(self.report.id, {
                "dump.log": work / "dump.log", "runc-checkpoint.log": work / RUNC_LOG})
        if self.report.result in (Result.OK, Result.FAILED):
            self.ctx.journals.drop(self.report.id)

    def save_journal(self, stage: Stage | None = None, *, durable: bool = True,
                     **extra: object) -> None:
        """Journal that the migration enters `stage` (before its step acts), or a
        strategy's own facts: a restarted source agent finishes the safety net from there
        (see recover). Not `durable` (no fsync) for facts a host crash makes moot."""
        if stage is not None:
            self.journal.stage = stage
        self.journal.extra.update(extra)
        self.ctx.journals.save(self.journal, durable)

    def reach(self, stage: Stage) -> None:
        """The migration reached `stage` (a step done, or a request about to be sent):
        known here, and journaled."""
        self.stage = stage
        self.save_journal(stage)

    async def migrate(self) -> None:
        await self.within_progress_timeout(self.steps_before_freeze())
        await self.migrate_frozen()

    async def steps_before_freeze(self) -> None:
        await self.prepare_destination()
        if self.shared:
            await self.write_back_rootfs(frozen=False)
        else:
            await self.send_rootfs(initial=True)
        await self.before_freeze()
        await self.arm()

    async def within_progress_timeout(self, steps: Awaitable[None]) -> None:
        """Run the steps before the freeze (no deadline of their own: a rootfs may take
        long) so that one that makes no progress (no step begins, no byte moves, e.g. the
        link is cut) for `--progress-timeout` seconds is cancelled, naming the step."""
        limit = self.options.progress_timeout
        timer = asyncio.timeout(limit)
        loop = asyncio.get_running_loop()

        def progressed() -> None:
            if not timer.expired():  # events still come while the stalled step unwinds
                timer.reschedule(loop.time() + limit)

        self.events.on_event = progressed
        try:
            await self.bounded(steps, timer, f"no progress for {limit:g} s")
        finally:
            self.events.on_event = None

    async def before_freeze(self) -> None:
        """Strategy hook: work done while the container still runs (pre-copy rounds)."""

    async def migrate_frozen(self) -> None:
        """Everything from the freeze on. The freeze deadline covers it up to the restore:
        from there on the destination runs the container."""
        await self.within_freeze_deadline(self.frozen_steps())
        await self.verify()
        await self.commit()
        await self.cleanup_source()

    async def frozen_steps(self) -> None:
        """The rootfs's frozen pass (or on shared storage, its write-back) runs beside the
        dump: the container cannot change it any more, and the dump writes only to its
        images."""
        await self.freeze()
        if self.shared:
            await run_together(self.dump(), self.write_back_rootfs(frozen=True))
        else:
            await run_together(self.dump(), self.send_rootfs(initial=False))
        await self.send_images_and_restore()

    async def within_freeze_deadline(self, steps: Awaitable[None]) -> None:
        """Run the frozen steps under the freeze deadline. When it passes, the step under
        way is cancelled (a transfer stops there) and the migration fails naming it; the
        rollback then kills the dump's runc and CRIU, aborts the destination and thaws
        the source."""
        limit = self.max_freeze()
        self.report.max_freeze_s = limit
        await self.bounded(steps, asyncio.timeout(limit),
                           f"freeze deadline of {limit:g} s passed")

    async def bounded(self, steps: Awaitable[None], timer: asyncio.Timeout,
                      overrun: str) -> None:
        """Run `steps` under `timer`; when it expires, fail with `overrun` and the step
        that was under way (a timeout raised by the steps themselves goes on up)."""
        try:
            async with timer:
                await steps
        except TimeoutError as exc:
            if not timer.expired():
                raise
            raise GodwitError(f"{overrun} during {self.current_phase()}") from exc

    def max_freeze(self) -> float:
        """Seconds the container may stay frozen: the operator's, or from its memory."""
        if self.options.max_freeze:
            return self.options.max_freeze
        return default_max_freeze(self.ctx.store.memory_usage(self.name))

    def current_phase(self) -> str:
        """The step under way, or the last to end (a step cut short ends after any step
        that overlapped it)."""
        if not self.report.phases:
            return "freeze"
        return max(self.report.phases, key=lambda phase: phase.ended or math.inf).name

    # steps
    async def prepare_destination(self) -> None:
        with self.events.phase("prepare"):
            await faults.point("prepare")
            info = self.ctx.dest_info or await self.ctx.dest.info()
            self.dest_info = info
            self.report.destination = info.name or self.report.destination
            if info.name == self.report.source:
                raise GodwitError(f"{self.name} is already on {self.report.source}")
            await self.preflight(info)
            await self.ctx.dest.prepare_incoming(self.incoming_request())
            self.reach(Stage.PREPARED)

    async def preflight(self, dest_info: HostInfo) -> None:
        """Refuse before anything is frozen when the destination cannot take the container."""
        needed_mem, needed_disk = await asyncio.to_thread(
            migration_needs, self.ctx.store, self.name, self.shared)
        self.upload_bytes = needed_disk
        findings = await run_checks(
            self.ctx.local_info, dest_info, self.ctx.dest, strategy=type(self),
            needed_mem=needed_mem, needed_disk=needed_disk,
            max_skew_s=self.options.max_clock_skew, incoming=self.incoming_request(),
        )
        pids = self.ctx.store.pids(self.name)
        findings.append(check_file_locks(procfs.file_locks(pids), self.shared))
        if not self.record.owns_netns and wants_own_netns(self.ctx.store.config(self.name)):
            findings.append(await asyncio.to_thread(check_own_netns, pids))
        self.report.preflight = [f.to_json() for f in findings]
        for finding in findings:
            if finding.level != "ok":
                self.events.log(f"pre-flight {finding.level}: {finding.message}")
        if not verdict(findings):
            raise GodwitError(f"pre-flight refused: {refusal(findings)}")

    def incoming_request(self) -> IncomingRequest:
        return incoming_request(self.ctx.store, self.name, self.options,
                                migration_id=self.report.id, source=self.report.source,
                                strategy=self.strategy, upload_bytes=self.upload_bytes)

    async def send_rootfs(self, *, initial: bool) -> None:
        """First pass while running; second pass, frozen, carries only what changed."""
        root = Path(self.record.rootfs)
        phase = "rootfs" if initial else "rootfs-sync"
        with self.events.phase(phase):
            await faults.point("rootfs")
            if initial or self.manifest is None:
                plan = await asyncio.to_thread(self.plan_whole_rootfs, root, initial)
                self.manifest = plan.manifest
            else:
                changed, deleted = await asyncio.to_thread(changes_since, self.manifest, root)
                plan = await asyncio.to_thread(plan_tree, root, changed, deleted)
            self.report.rootfs_bytes += await self.upload("rootfs", plan, phase)

    async def write_back_rootfs(self, *, frozen: bool) -> None:
        """On shared storage: write back the files the container may hold dirty, while it
        runs and again once frozen, before the destination restores from the storage."""
        with self.events.phase("rootfs-sync" if frozen else "rootfs"):
            await faults.point("rootfs")
            pids = self.ctx.store.pids(self.name)
            await asyncio.to_thread(write_back_written_files, pids)

    def plan_whole_rootfs(self, root: Path, running: bool) -> TreePlan:
        """Scan the whole rootfs. While the container runs, the files it maps shared are
        written back first, and the scan counts from before that (see `write_back`)."""
        started = time.time_ns()
        if running:
            write_back_mapped_files(self.ctx.store.pids(self.name))
        return plan_tree(root, started_ns=started)

    async def arm(self) -> None:
        """Start the dump here and the restore there, each held just before CRIU: both at
        once when runc's state tells the container's stdio (what the dump's
        descriptors.json will say, and the destination's runc needs before its CRIU)."""
        with self.events.phase("arm"):
            await faults.point("arm")
            self.images.mkdir(parents=True, exist_ok=True)
            self.fills_after_restore = self.can_fill_after_restore()
            self.prepare_dump()
            if (stdio := self.runc.stdio_descriptors(self.name)) is None:
                self.held_dump = await self.hold_dump()
                armed = await self.arm_destination(self.dump_descriptors())
            else:
                armed = await self.arm_beside_hold(stdio)
            if armed.page_server:
                self.send_pages_to(armed.page_server)

    async def arm_beside_hold(self, stdio: list[str]) -> Armed:
        """Arm the destination with `stdio` while the dump is held here; the held dump is
        kept (for the rollback to call off) however the arm ends."""
        hold = asyncio.create_task(self.hold_dump())
        try:
            armed = await self.arm_destination(stdio)
        except BaseException:
            with contextlib.suppress(Exception):  # the arm's failure is the one to tell
                self.held_dump = await hold
            raise
        self.held_dump = await hold
        if (dumped := self.dump_descriptors()) != stdio:
            raise GodwitError(f"runc's dump gives the container's stdio as {dumped}, "
                              f"its state as {stdio}")
        return armed

    def dump_descriptors(self) -> list[str]:
        """The container's stdio, as the held dump's runc wrote it."""
        return json.loads((self.images / "descriptors.json").read_text())

    async def arm_destination(self, descriptors: list[str]) -> Armed:
        return await self.ctx.dest.arm_incoming(
            self.report.id, descriptors, stream_pages=self.streams_pages(),
            fill_after_restore=self.fills_after_restore,
            lazy_page_server=self.lazy_page_server_at_arm(),
            images_in_memory=self.images_in_memory())

    def images_in_memory(self) -> bool:
        """Strategy hook: the dump's images are small, and the destination (protocol 2.7
        or later) may keep them on a tmpfs."""
        return False

    def lazy_page_server_at_arm(self) -> str | None:
        """Strategy hook: the page server a lazy restore will pull the memory from, told
        at arm (post-copy, to a destination of protocol 2.5 or later)."""
        return None

    def streams_pages(self) -> bool:
        """Stream unless the operator asked for godwit's compression or bandwidth limit
        (CRIU's page server has neither; QoS still shapes it) or the destination is older.
        Shared memory streams too: CRIU patch 0015 keeps the TLS session in step across
        the IPC namespace's dump helper, which sends System V segments' pages."""
        return (self.stream_pages and not self.options.compress and not self.options.rate_limit
                and protocol_at_least(self.dest_protocol, (2, 1)))

    @property
    def dest_protocol(self) -> str:
        """The destination's protocol version ("0.0" before it answered)."""
        return self.dest_info.protocol if self.dest_info else "0.0"

    def can_fill_after_restore(self) -> bool:
        """Restore lazily from the pages on the destination, unless the operator keeps the
        memory copy in the freeze (`--eager-restore`) or the destination cannot (protocol
        older than 2.3, no userfaultfd for CRIU, a runc without `restore --lazy-pages`)."""
        info = self.dest_info
        return bool(self.fill_after_restore and not self.options.eager_restore and info
                    and protocol_at_least(self.dest_protocol, (2, 3))
                    and info.criu and info.criu.lazy_pages
                    and info.runc_features and info.runc_features.lazy_restore)

    def send_pages_to(self, page_server: str) -> None:
        """Point the held dump at the destination's page server: CRIU reads the container's
        config file only when it starts. Over mutual TLS, the server's name checked."""
        address, _, port = page_server.rpartition(":")
        self.pages_to = page_server
        self.save_journal(pages_to=page_server)  # a restarted agent still resets the config
        self.ctx.store.write_criu_config(self.name, [
            "page-server", f"address {address}", f"port {port}",
            *tls_config_lines(self.ctx.tls)])

    def prepare_dump(self) -> None:
        """Strategy hook: what the held dump and the destination's arm both need."""

    async def hold_dump(self) -> HeldRunc:
        return await self.runc.hold_checkpoint(self.name, self.dump_options())

    async def call_off_dump(self) -> None:
        """Rollback: a dump still held never starts."""
        held, self.held_dump = self.held_dump, None
        if held:
            await held.call_off()
        self.stop_sending_pages()

    def stop_sending_pages(self) -> None:
        """A later dump of this container (a retry, a checkpoint) writes its pages here."""
        if self.pages_to:
            self.ctx.store.write_criu_config(self.name)
            self.pages_to = None

    async def freeze(self) -> None:
        with self.events.phase("freeze"):
            if self.ctx.cluster:
                await self.ctx.cluster.before_freeze()
            self.report.frozen_at = time.time()  # processes stop during the pause call
            self.save_journal(Stage.FROZEN)
            await asyncio.to_thread(self.ctx.store.freeze, self.name)
            self.stage = Stage.FROZEN
            await faults.point("freeze")
        if self.record.net:
            await self.move_address()

    async def move_address(self) -> None:
        """Isolate the frozen source copy; the destination answers for its MAC and IP from
        now on, holding arriving packets until the restore."""
        with self.events.phase("switch"):
            self.save_journal(Stage.ISOLATED)
            await asyncio.to_thread(self.ctx.store.networking.isolate, self.name)
            self.stage = Stage.ISOLATED
            await self.ctx.dest.activate_incoming(self.report.id)

    def dump_options(self) -> CheckpointOptions:
        return CheckpointOptions(image_path=self.images,
                                 work_path=self.ctx.work_dir / "dump-work",
                                 leave_running=True, tcp_established=True)

    async def dump(self) -> None:
        with self.events.phase("dump"):
            await self.run_dump()
        self.stop_sending_pages()

    async def run_dump(self) -> Any:
        """Let the held dump proceed; returns its outcome (the lazy dump's process for
        post-copy). Cancelled (the freeze deadline), it stays in `held_dump` for the
        rollback to kill."""
        held = self.held_dump
        assert held, "arm() holds the dump"
        held.release()
        await faults.point("dump", held.proc.pid)
        try:
            outcome = await held.outcome()
        except GodwitError as exc:
            self.held_dump = None
            work = self.dump_options().work_path
            raise GodwitError(f"dump failed: {log_error(work, 'dump.log') or exc}") from exc
        self.held_dump = None
        return outcome

    async def send_images_and_restore(self) -> None:
        """In one request where the destination takes it (protocol 2.6), else two."""
        if protocol_at_least(self.dest_protocol, (2, 6)):
            await self.restore(with_images=True)
        else:
            await self.send_images()
            await self.restore()

    async def send_images(self) -> None:
        """Send the dump (to a destination older than 2.6, see `restore`)."""
        with self.events.phase("images"):
            await faults.point("images")
            plan = await asyncio.to_thread(plan_tree, self.images)
            self.report.image_bytes += await self.upload("images", plan, "images")
        await self.drop_images()

    async def drop_images(self) -> None:
        """The local copy of the dump goes once sent (a rollback resumes the paused
        container, not the images), which spares the host writing it back to disk."""
        await asyncio.to_thread(shutil.rmtree, self.images, True)

    async def restore(self, with_images: bool = False) -> None:
        """Have the destination restore; `with_images` (protocol 2.6), the dump's images
        are the request's body (the "images" phase until they are all sent), and the
        restore follows once they are all in."""
        with contextlib.ExitStack() as phases:
            def enter(phase: str) -> None:
                phases.close()
                phases.enter_context(self.events.phase(phase))

            enter("images" if with_images else "restore")
            if with_images:
                await faults.point("images")
            await faults.point("restore")
            plan = await asyncio.to_thread(plan_tree, self.images) if with_images else None
            self.restore_sent_at = time.monotonic()
            self.reach(Stage.RESTORE_SENT)
            restored = await (self.restore_after_images(plan, lambda: enter("restore"))
                              if plan else
                              self.ctx.dest.restore_incoming(self.report.id,
                                                             self.restore_request()))
            self.restored_at = time.monotonic()  # running there before the journal knows
            self.report.resumed_at = time.time()
            self.reach(Stage.RESTORED)
            self.report.held_packets = restored.held_packets
            if restored.page_bytes:
                self.report.image_bytes += restored.page_bytes
                self.report.pages = f"{restored.page_bytes} bytes streamed during the dump"
            self.report.downtime_s = self.report.resumed_at - (self.report.frozen_at or 0)
        if with_images:
            await self.drop_images()

    async def restore_after_images(self, plan: TreePlan, then: Callable[[], None]
                                   ) -> Restored:
        """The images as the restore request's body; `then()` once they are all sent. The
        fence's clock is taken again then: the destination restores, and arms its fence,
        only once they are all in."""
        def all_sent() -> None:
            self.restore_sent_at = time.monotonic()
            then()

        stream = self.tree_stream("images", plan, "images")
        restored = await self.ctx.dest.restore_with_images(self.report.id,
                                                           _then(stream, all_sent))
        self.report.image_bytes += plan.total_bytes
        self.report.wire_bytes += stream.stats.wire_bytes
        return restored

    def restore_request(self) -> RestoreRequest:
        """What the destination's restore needs beyond the staged files."""
        return RestoreRequest()

    async def verify(self) -> None:
        """The restored copy has all its memory (when filled after the restore) and must
        still be running a moment (`SETTLE_S`) after its restore; time spent since (the
        pages) counts towards it."""
        if self.fills_after_restore:
            await self.wait_for_pages()
        with self.events.phase("verify"):
            await faults.point("verify")
            await asyncio.sleep(self.settle_left())
            try:
                async with asyncio.timeout(VERIFY_TIMEOUT_S):
                    state = await self.ctx.dest.container(self.name)
            except TimeoutError as exc:
                raise GodwitError(f"destination did not answer within {VERIFY_TIMEOUT_S:g} s "
                                  "after the restore") from exc
            if state.status != "running":
                raise GodwitError(f"restored container is {state.status} on destination")

    async def wait_for_pages(self) -> None:
        """Until the restored copy holds every page, the frozen source is the only full
        copy: wait for the destination's lazy-pages daemon to report its outcome."""
        with self.events.phase("pages"):
            while True:
                asked = time.monotonic()
                if (state := await self.destination_pages()) not in ("transferring", None):
                    break
                if time.monotonic() > self.fence_deadline():
                    raise GodwitError("memory pages did not all arrive before the deadline")
                await asyncio.sleep(max(0.0, asked + PAGES_POLL_S - time.monotonic()))
            if not state.startswith("complete"):
                raise GodwitError(f"{self.strategy} page transfer failed: {state}")
            filled = state.removeprefix("complete: ")
            self.report.pages = f"{self.report.pages}; {filled}" if self.report.pages else filled

    async def destination_pages(self) -> str | None:
        """transferring, complete, failed: …; None while the destination does not answer.
        A destination of protocol 2.4 or later answers once the fill has settled (or
        PAGES_WAIT_S on); an older one at once, and is asked every PAGES_POLL_S."""
        try:
            if protocol_at_least(self.dest_protocol, (2, 4)):
                state = await self.ctx.dest.incoming_pages(self.report.id)
            else:
                state = await self.ctx.dest.incoming_state(self.report.id)
        except GodwitError:
            return None
        return state.pages or state.state

    def settle_left(self) -> float:
        if self.restored_at is None:  # after an agent restart: a full moment from now
            return SETTLE_S
        return max(0.0, self.restored_at + SETTLE_S - time.monotonic())

    async def commit(self) -> None:
        with self.events.phase("commit"):
            await faults.point("commit")
            self.reach(Stage.COMMIT_SENT)
            try:
                await self.ctx.dest.commit_incoming(self.report.id)
            except GodwitError as exc:
                if not (self.ctx.cluster or isinstance(exc, AgentUnreachable)):
                    raise
                await self.learn_commit_outcome()

    async def learn_commit_outcome(self) -> None:
        """The commit answer was lost: in cluster mode etcd holds the decision (one is
        written if none was); else ask the destination until the fence deadline passes."""
        if self.ctx.cluster:
            try:
                decision = await self.ctx.cluster.outcome()
            except ClusterUnavailable as exc:
                raise InDoubt(f"commit sent; neither the destination nor etcd answers: "
                              f"{exc}") from exc
            if decision == COMMITTED:
                return
            raise GodwitError(f"the destination did not commit (etcd: {decision})")
        while time.monotonic() < self.fence_deadline():
            state = await self.destination_state()
            if state is DestinationState.COMMITTED:
                return
            if state in _NOT_COMMITTED:
                raise GodwitError(f"destination copy was {state} before the commit")
            if state is DestinationState.PENDING:  # the commit was lost: send it again
                with contextlib.suppress(GodwitError):
                    await self.ctx.dest.commit_incoming(self.report.id)
            await asyncio.sleep(0.5)
        raise InDoubt("commit sent but the destination is unreachable; source copy left paused")

    async def cleanup_source(self) -> None:
        """The destination runs the container for good: the paused source copy goes. Its
        netns (its address is the destination's now) and the destination's staging go
        first; the copy itself and the work dir are deleted after the answer
        (`godwit.departures`: hidden from here on, deleted in the background)."""
        with self.events.phase("cleanup"):
            if self.record.owns_netns:  # isolated since the freeze: its netns can go first
                await asyncio.to_thread(self.ctx.store.networking.delete, self.name)
            with contextlib.suppress(GodwitError):  # else it goes with the destination's sweep
                await self.ctx.dest.forget_incoming(self.report.id)
            self.ctx.store.departures.start(self.name, keep_rootfs=self.shared,
                                            then=self.drop_work_dir)

    async def drop_work_dir(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.ctx.work_dir, True)

    # transfers
    async def upload(self, what: str, plan: TreePlan, phase: str) -> int:
        """Stream a tree plan to the destination; returns the payload bytes sent."""
        body = self.tree_stream(what, plan, phase)
        result = await self.ctx.dest.upload(self.report.id, what, body)
        self.report.wire_bytes += result.wire_bytes
        return plan.total_bytes

    def tree_stream(self, what: str, plan: TreePlan, phase: str) -> TreeStream:
        """The wire stream of `plan` (the rootfs or images), its progress reported under
        `phase`."""
        last = 0.0

        def on_progress(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S or done >= plan.total_bytes:
                last = now
                self.events.progress(phase, done, plan.total_bytes)

        return send_tree(plan, compress=self.options.compress, digest=self.file_digest(),
                         rate_limit=self.options.rate_limit, on_progress=on_progress,
                         tamper=faults.corrupter("rootfs" if what == "rootfs" else "images"))

    def file_digest(self) -> str:
        """BLAKE3 for the files' digests, sha256 to a destination older than 2.8."""
        return BLAKE3 if protocol_at_least(self.dest_protocol, (2, 8)) else SHA256

    # safety net
    def fence_deadline(self) -> float:
        assert self.restore_sent_at is not None
        return self.restore_sent_at + self.fence_timeout + FENCE_MARGIN_S

    @property
    def fence_timeout(self) -> float:
        """Seconds from the restore until the destination fences an uncommitted copy."""
        return self.options.commit_timeout

    async def destination_state(self, within: float | None = None) -> DestinationState | None:
        """The destination's decision; None when it does not answer (`within` seconds)."""
        try:
            async with asyncio.timeout(within):
                return (await self.ctx.dest.incoming_state(self.report.id)).state
        except (GodwitError, TimeoutError):  # an answer this agent cannot read: none
            return None

    async def rollback(self) -> str:
        """Undo a failed migration; return where the container runs now."""
        await self.call_off_dump()
        dest_state = await self.abort_destination() if self.prepared else None
        if dest_state is DestinationState.COMMITTED:
            await self.cleanup_source()
            self.report.result, self.report.error = Result.OK, None
            return f"running on {self.report.destination}"
        if not self.frozen:
            return f"running on {self.report.source} (never frozen)"
        try:
            await self.release_source()
            if self.restored and self.record.net:
                await asyncio.to_thread(self.ctx.store.networking.reset_connections,
                                        self.name, ContainerNet.from_json(self.record.net))
            if self.isolated:
                await asyncio.to_thread(self.ctx.store.networking.connect, self.name)
            await self.resume_source()
        except Exception as exc:  # report it; the journal stays for a restart to retry
            self.report.result = Result.IN_DOUBT
            return f"paused on {self.report.source}, could not resume: {_one_line(exc)}"
        self.report.resumed_at = time.time()
        self.report.downtime_s = self.report.resumed_at - (self.report.frozen_at or 0)
        return f"running on {self.report.source} (resumed)"

    async def resume_source(self) -> None:
        """Resume the paused copy (a copy that already runs again is fine)."""
        state = await self.ctx.store.state(self.name)
        if state and state.status == "running":
            return
        await self.runc.resume(self.name)

    async def release_source(self) -> None:
        """Strategy hook: stop whatever still holds the source before it resumes."""

    async def abort_destination(self) -> DestinationState | None:
        """Abort the destination copy; after a restore request, nothing but a confirmed
        abort, a known commit or the passing of the fence deadline will do. None: the
        destination does not answer, and no copy runs there (no restore was asked)."""
        while True:
            try:
                return (await self.ctx.dest.abort_incoming(self.report.id)).state
            except GodwitError:
                if self.restore_sent_at is None:  # no restore, no commit: nothing runs there
                    return None
                left = self.fence_deadline() - time.monotonic()
                committed = DestinationState.COMMITTED
                if left > 0 and await self.destination_state(within=left) is committed:
                    return committed
            if time.monotonic() >= self.fence_deadline():
                return DestinationState.FENCED
            await asyncio.sleep(0.5)


_NOT_COMMITTED = (DestinationState.FENCED, DestinationState.ABORTED, DestinationState.UNKNOWN)


async def run_together(*steps: Awaitable[None]) -> None:
    """Run `steps` at once. The first to fail cancels the others, and its exception is
    raised as it is, not in a group."""
    first_failure = None
    try:
        async with asyncio.TaskGroup() as group:
            for step in steps:
                group.create_task(step)
    except BaseExceptionGroup as failed:
        first_failure = failed.exceptions[0]
    if first_failure is not None:
        raise first_failure


async def _then(stream: AsyncIterable[bytes], done: Callable[[], None]
                ) -> AsyncIterator[bytes]:
    """`stream`, then `done()` once its last piece was taken."""
    async for piece in stream:
        yield piece
    done()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
