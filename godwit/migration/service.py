"""The outgoing migrations of one agent: the agent hands each request here and streams
the events back; everything else (strategy choice, report, journals, the peer client,
recovery after a restart) happens in this package."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from godwit.api import DEFAULT_PORT, AgentClient
from godwit.cluster.migration_hooks import ClusterMigrations, SourceGuard
from godwit.containers import ContainerStore
from godwit.errors import Conflict, GodwitError
from godwit.migration import MigrationOptions
from godwit.migration.failure_logs import FailureLogs
from godwit.migration.journal import Journal, Journals
from godwit.migration.report import EventStream, MigrationReport, ReportArchive
from godwit.migration.source import SourceContext, incoming_request, migration_needs
from godwit.migration.states import Result
from godwit.migration.strategies import choose_strategy, strategy_class
from godwit.preflight import Finding, run_checks
from godwit.protocol import HostInfo
from godwit.tls import TLSFiles, client_context

log = logging.getLogger("godwit.agent")  # the agent's log, as before the move
RESTORE_TIMEOUT_S = 600
RECOVERY_TIMEOUT_S = 30
SETTLE_TIMEOUT_S = 10


class Migrations:
    """Sends this host's containers away, one migration per container at a time."""

    def __init__(self, host: str, store: ContainerStore, state_dir: Path,
                 describe_host: Callable[[], Awaitable[HostInfo]],
                 tls: TLSFiles | None = None,
                 failure_logs: FailureLogs | None = None) -> None:
        self.host = host
        self.store = store
        self.describe_host = describe_host
        self.tls = tls
        self.failure_logs = failure_logs
        self.journals = Journals(state_dir)
        self.reports = ReportArchive(state_dir / "reports")
        self.criu: dict = {}  # this host's CRIU capabilities, once probed
        self.port = DEFAULT_PORT  # the agent's, whose block of ports migrations use
        self.running: dict[str, asyncio.Task] = {}
        self.cluster: ClusterMigrations | None = None  # cluster mode: lock, decisions

    def busy(self, name: str) -> bool:
        """A migration of this container is under way (or being recovered)."""
        return name in self.running

    def in_doubt(self, name: str) -> bool:
        """An earlier migration of it ended in doubt and awaits the operator."""
        return bool(self.journals.of(name))

    async def start(self, name: str, options: MigrationOptions) -> EventStream:
        """Start migrating a container; its events come on the stream returned. Refused
        (Conflict, NotFound; in cluster mode also without the lock or etcd) before anything
        is touched."""
        self.store.record(name)
        if self.busy(name):
            raise Conflict(f"container {name} is already being migrated")
        if self.in_doubt(name):
            raise Conflict(f"an earlier migration of {name} ended in doubt: check its "
                           f"destination, then `godwit resume {name}` or `godwit rm {name}`")
        report = self.new_report(name, options)
        guard = self.cluster.source(name, report.id, options.to) if self.cluster else None
        if guard:
            await guard.begin()
        events = EventStream(report)
        task = asyncio.create_task(self.run(name, options, events, guard))
        self.running[name] = task
        task.add_done_callback(lambda _: self.running.pop(name, None))
        return events

    def new_report(self, name: str, options: MigrationOptions) -> MigrationReport:
        record = self.store.record(name)
        return MigrationReport(
            id=str(uuid.uuid4()), container=name, source=self.host,
            destination=options.to, strategy=self.pick_strategy(options, name, None),
            options=options.to_json(), image=record.image, image_digest=record.image_digest,
        )

    def pick_strategy(self, options: MigrationOptions, name: str | None,
                      dest_info: HostInfo | None) -> str:
        memory = self.store.private_memory(name) if name else 0
        dest_caps = dest_info.criu.to_json() if dest_info and dest_info.criu else None
        return choose_strategy(options.strategy, self.criu, dest_caps, memory)

    async def run(self, name: str, options: MigrationOptions, events: EventStream,
                  guard: SourceGuard | None = None) -> None:
        """Run one migration to its end; its report is always saved and the client told."""
        try:
            async with self.peer(options.to, RESTORE_TIMEOUT_S) as dest:
                ctx, dest_info = await asyncio.gather(
                    self.source_context(dest, events.report.id), dest.info())
                ctx.cluster, ctx.dest_info = guard, dest_info
                strategy = self.pick_strategy(options, name, dest_info)
                events.report.strategy = strategy
                await strategy_class(strategy)(ctx, name, options, events).execute()
        except Exception as exc:  # before anything was frozen: the container is untouched
            log.exception("migration %s of %s could not start", events.report.id, name)
            events.report.result, events.report.error = Result.FAILED, str(exc)
            events.report.outcome = f"running on {self.host} (never frozen)"
        finally:
            try:
                self.reports.save(events.report)
                if guard:  # before the client hears the end: etcd has the report, no lock
                    await guard.end(events.report.to_json())
            finally:  # the client hears the end whatever happened above
                events.close()
                log.info("migration %s of %s: %s", events.report.id, name,
                         events.report.result)

    def peer(self, address: str, timeout: float = 30) -> AgentClient:
        """A client for another agent, presenting this agent's certificate (its TLS context
        is rebuilt when the files change, so a new CRL applies to the next migration)."""
        ssl_context = client_context(self.tls) if self.tls else None
        return AgentClient(address, ssl_context, timeout=timeout)

    async def source_context(self, dest: AgentClient, migration_id: str) -> SourceContext:
        return SourceContext(self.store, dest, self.journals,
                             self.journals.work_dir(migration_id), await self.describe_host(),
                             self.tls, self.port, self.failure_logs)

    async def check(self, name: str | None,
                    options: MigrationOptions) -> tuple[HostInfo, list[Finding]]:
        """`godwit check`: the pre-flight checks from this host to `options.to`, nothing
        frozen; returns the destination's info and the findings."""
        mem, disk = await asyncio.to_thread(migration_needs, self.store, name, False) \
            if name else (0, 0)
        async with self.peer(options.to) as dest:
            dest_info = await dest.info()
            strategy = strategy_class(self.pick_strategy(options, name, dest_info))
            incoming = incoming_request(
                self.store, name, options, migration_id=str(uuid.uuid4()), source=self.host,
                strategy=strategy.strategy, upload_bytes=disk) if name else None
            findings = await run_checks(
                await self.describe_host(), dest_info, dest, strategy=strategy,
                needed_mem=mem, needed_disk=disk, max_skew_s=options.max_clock_skew,
                incoming=incoming)
        return dest_info, findings

    async def settle(self, name: str) -> None:
        """The operator decided (resume or rm): forget the in-doubt migrations, here and
        (when it answers) on their destination."""
        for journal in self.journals.of(name):
            self.journals.drop(journal.id)
            with contextlib.suppress(GodwitError):
                async with self.peer(journal.options["to"], SETTLE_TIMEOUT_S) as dest:
                    await dest.forget_incoming(journal.id)

    async def recover(self) -> None:
        """Settle the migrations a previous agent process left half way: the paused source
        copy is resumed, or deleted when the destination had committed."""
        journals = self.journals.all()
        for journal in journals:
            self.running[journal.name] = asyncio.current_task()  # type: ignore[assignment]
        for journal in journals:
            try:
                await self.recover_one(journal)
            except Exception:  # one broken journal must not block the others
                log.exception("could not settle migration %s", journal.id)
            finally:
                self.running.pop(journal.name, None)

    async def recover_one(self, journal: Journal) -> None:
        options = MigrationOptions.from_json(journal.options)
        report = MigrationReport(id=journal.id, container=journal.name, source=self.host,
                                 destination=options.to, strategy=journal.strategy,
                                 options=journal.options)
        strategy = strategy_class(journal.strategy)
        async with self.peer(options.to, RECOVERY_TIMEOUT_S) as dest:
            ctx = await self.source_context(dest, report.id)
            if self.cluster:  # no lock (its holder died): only etcd's decision is read
                ctx.cluster = self.cluster.source(report.container, report.id, options.to)
            try:
                migration = strategy(ctx, report.container, options, EventStream(report))
            except GodwitError as exc:  # the container is gone: nothing to settle
                log.warning("migration %s: %s", report.id, exc)
                self.journals.discard(report.id)
                return
            await migration.recover(journal)
        self.reports.save(report)
        log.warning("recovered migration %s of %s: %s, %s", report.id, report.container,
                    report.result, report.outcome)
