"""An agent's share of the evacuation plans: the containers of its own host.

The runner wakes on a watch of `plans/` (and every RESCAN_S anyway), reads the running
plans that name its host, and moves each pending task: at most `per_host` at once from this
host, each holding one of the plan's `per_cluster` slots. It migrates through its own
agent's API, like an operator would, so a plan's migration is an ordinary one (safety net,
report, metrics; in-process, as the agent itself: the API's migrate route is an
operator's). A task found "running" with no worker is one this agent ran before it
restarted: the container's state on this host says how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from godwit.cluster import plans
from godwit.cluster.membership import HOSTS
from godwit.cluster.ownership import LOCK_TTL_S
from godwit.cluster.plans import Plan
from godwit.cluster.store import ClusterUnavailable, Entry, Store
from godwit.errors import GodwitError
from godwit.evacuation import attempt
from godwit.migration import MigrationOptions

log = logging.getLogger("godwit.cluster")
RESCAN_S = 5.0
SLOT_WAIT_S = 2.0
BUSY_WAIT_S = 2 * LOCK_TTL_S
BUSY_RETRY_S = 1.0


@dataclass(frozen=True)
class LocalAgent:
    """What the runner needs of its own agent: start a migration (its events as plain
    JSON; a refusal raises Conflict before anything is touched), a container's status
    (None: not on this host)."""

    migrate: Callable[[str, MigrationOptions], AsyncIterator[dict]]
    status: Callable[[str], Awaitable[str | None]]


class PlanRunner:
    """`runner.start()` once the host is registered; `await runner.stop()` before leaving."""

    def __init__(self, store: Store, host: str, lease: Callable[[], int],
                 local: LocalAgent) -> None:
        self.store, self.host, self.lease, self.local = store, host, lease, local
        self.workers: dict[str, asyncio.Task] = {}  # task key → its worker
        self.gates: dict[str, asyncio.Semaphore] = {}  # plan id → per-host limit
        self.plans_changed = asyncio.Event()
        self.slots_freed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._wake_on(plans.PLANS, self.plans_changed)),
                       asyncio.create_task(self._wake_on(plans.SLOTS, self.slots_freed)),
                       asyncio.create_task(self._loop(), name=f"plans of {self.host}")]

    async def stop(self) -> None:
        for task in [*self._tasks, *self.workers.values()]:
            task.cancel()
        for task in [*self._tasks, *self.workers.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _wake_on(self, prefix: str, event: asyncio.Event) -> None:
        while True:
            try:
                async for _ in self.store.watch(prefix):
                    event.set()
            except Exception as e:  # a broken watch: the rescan covers it
                log.warning("etcd watch of %s: %s", prefix, e)
            await asyncio.sleep(RESCAN_S)

    async def _loop(self) -> None:
        while True:
            self.plans_changed.clear()
            try:
                await self.scan()
            except GodwitError as e:
                log.warning("evacuation plans: %s", e)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESCAN_S):
                    await self.plans_changed.wait()

    async def scan(self) -> None:
        """Start a worker for each task of this host that is not final and has none."""
        for plan in await plans.active(self.store):
            if self.host not in plan.hosts:
                continue  # only the hosts emptied read a plan's tasks: no fan-out
            for entry in await plans.tasks(self.store, plan.id, self.host):
                if entry.value["result"] not in plans.FINAL and entry.key not in self.workers:
                    self._spawn(plan, entry)
            await plans.finish_if_complete(self.store, plan)

    def _spawn(self, plan: Plan, entry: Entry) -> None:
        worker = asyncio.create_task(self._work(plan, entry), name=f"plan {entry.key}")
        self.workers[entry.key] = worker
        worker.add_done_callback(lambda _: self.workers.pop(entry.key, None))

    async def _work(self, plan: Plan, entry: Entry) -> None:
        gate = self.gates.setdefault(plan.id, asyncio.Semaphore(plan.per_host))
        try:
            async with gate:
                slot = await self._take_slot(plan, entry)
                try:
                    await self.move(plan, entry)
                finally:
                    with contextlib.suppress(ClusterUnavailable):
                        await plans.free_slot(self.store, slot)
            await plans.finish_if_complete(self.store, plan)
        except GodwitError as e:  # etcd out of reach: the next scan retries the task
            log.warning("plan %s, %s: %s", plan.id, entry.value["container"], e)
        self.plans_changed.set()

    async def _take_slot(self, plan: Plan, entry: Entry) -> str:
        holder = {"host": self.host, "container": entry.value["container"]}
        while (slot := await plans.take_slot(self.store, plan, self.lease(), holder)) is None:
            self.slots_freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SLOT_WAIT_S):
                    await self.slots_freed.wait()
        return slot

    async def move(self, plan: Plan, entry: Entry) -> None:
        """Try the planned destination, then the plan's others, until one takes it."""
        name = entry.value["container"]
        if entry.value["result"] == "running" and (entry := await self._resume(entry)) is None:
            return
        tried = {a["destination"] for a in entry.value["attempts"]}
        for destination in _candidates(plan, entry.value["planned"], tried):
            registered = await self.store.get(HOSTS + destination)
            if registered is None:
                continue  # not registered (down): try the next one
            address = registered.value["address"]
            if (entry := await self._update(entry, result="running",
                                            destination=destination)) is None:
                return
            started = time.time()
            report = await self._migrate(plan, name, address)
            attempts = [*entry.value["attempts"], {
                "destination": destination, "result": report.get("result"),
                "error": report.get("error"), "migration": report.get("id"),
                "started": started, "ended": time.time()}]
            result = report.get("result")
            if result == "ok" or result == "in-doubt" or report.get("source_lost"):
                final = "unknown" if report.get("source_lost") else result
                await self._update(entry, result=final, attempts=attempts,
                                   downtime_s=report.get("downtime_s"),
                                   destination=destination if result == "ok" else None)
                return
            if (entry := await self._update(entry, attempts=attempts, destination=None)) \
                    is None:
                return
        await self._update(entry, result="failed" if entry.value["attempts"] else
                           "no destination")

    async def _migrate(self, plan: Plan, name: str, address: str) -> dict:
        """One migration; while the source refuses it because the container is busy (its
        lock held, e.g. by this agent's previous life until the lock's lease expires),
        ask again for up to BUSY_WAIT_S."""
        options = MigrationOptions.from_json({**plan.options, "to": address})
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            report = await attempt(name, address, lambda n, _: self.local.migrate(n, options))
            if not report.get("refused") or time.monotonic() > deadline:
                return report
            await asyncio.sleep(BUSY_RETRY_S)

    async def _resume(self, entry: Entry) -> Entry | None:
        """A task this host's agent ran before it restarted: where is the container now?"""
        name, destination = entry.value["container"], entry.value["destination"]
        status = await self.local.status(name)
        if status == "running":  # never moved (or rolled back): try again
            log.info("plan task %s resumed after a restart", entry.key)
            return await self._update(entry, result="pending", destination=None)
        if status is not None:  # paused: an in-doubt leftover, for the operator
            final = {"result": "in-doubt", "destination": None}
        else:  # gone from here: committed to the destination it was moving to
            final = {"result": "ok" if destination else "unknown", "destination": destination}
        await self._update(entry, **final)
        return None

    async def _update(self, entry: Entry, **changes: object) -> Entry | None:
        updated = await plans.update_task(self.store, entry, **changes)
        if updated is None:
            log.warning("plan task %s changed under this agent: left alone", entry.key)
        return updated


def _candidates(plan: Plan, planned: str, tried: set[str]) -> list[str]:
    """The planned destination first, then the plan's others, never one already tried."""
    order = [planned, *(d for d in plan.destinations if d != planned)]
    return [d for d in order if d not in tried and d not in plan.hosts]
