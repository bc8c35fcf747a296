"""`godwit evacuate` in cluster mode: write a plan to etcd, then (or with --watch) follow it.

The CLI only plans and watches: the agents of the hosts emptied run the migrations, so the
plan completes without this process.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack

from godwit.cli.cluster import cluster_store
from godwit.cli.common import Context, console
from godwit.cli.hosts import registered_addresses
from godwit.cluster import plans
from godwit.cluster.plans import Plan
from godwit.cluster.store import Store
from godwit.errors import GodwitError, NotFound
from godwit.evacuation import Outcome, Planner, free_memory
from godwit.migration import MigrationOptions

MOVABLE = ("running",)  # a paused container may be an in-doubt leftover: left alone
POLL_S = 2.0


async def start_plan(ctx: Context, hosts: list[str], targets: list[str], per_host: int,
                     per_cluster: int, template: MigrationOptions) -> Plan:
    """Place every running container of `hosts` on the destinations by free memory and
    write the plan."""
    ctx.config.hosts = await registered_addresses(ctx)
    if unknown := [h for h in [*hosts, *targets] if h not in ctx.config.hosts]:
        raise GodwitError(f"not a live host of the cluster: {', '.join(unknown)}")
    destinations = [h for h in targets or ctx.config.hosts if h not in hosts]
    if not destinations:
        raise GodwitError("no destination host left: every live host is being evacuated")
    async with AsyncExitStack() as stack:
        clients = {h: await stack.enter_async_context(ctx.client(h, timeout=30))
                   for h in {*hosts, *destinations}}
        planner = Planner(await free_memory({d: clients[d] for d in destinations}))
        if not planner.free:
            raise GodwitError("no destination host is reachable")
        rows = [(h, c) for h in hosts for c in await clients[h].containers()
                if c.status in MOVABLE]
    tasks = []
    for host, row in sorted(rows, key=lambda r: r[1].memory, reverse=True):
        planned = planner.pick(row.memory, set())
        if planned is None:
            raise GodwitError("no destination host is reachable")
        tasks.append(plans.new_task(host, row.name, row.memory, planned))
    plan = Plan(hosts, list(planner.free), per_host, per_cluster,
                {k: v for k, v in template.to_json().items() if k != "to"})
    async with cluster_store(ctx) as store:
        await plans.create(store, plan, tasks)
    return plan


async def watch_plan(ctx: Context, plan_id: str | None, quiet: bool) -> list[dict]:
    """Print each task's changes until the plan is done; its tasks at the end."""
    async with cluster_store(ctx) as store:
        plan = await _pick_plan(store, plan_id)
        if not quiet:
            console.print(f"plan {plan.id}: evacuating {', '.join(plan.hosts)} to "
                          f"{', '.join(plan.destinations)} ({plan.per_host} per host, "
                          f"{plan.per_cluster} in the cluster at once)")
        wake = asyncio.Event()
        watcher = asyncio.create_task(_wake_on_changes(store, plan.id, wake))
        try:
            return await _follow(store, plan, wake, quiet)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


async def _pick_plan(store: Store, plan_id: str | None) -> Plan:
    if plan_id:
        if (plan := await plans.load(store, plan_id)) is None:
            raise NotFound(f"no evacuation plan {plan_id}")
        return plan
    running = await plans.active(store)
    if len(running) != 1:
        listed = ", ".join(p.id for p in running) or "none"
        raise GodwitError(f"{len(running)} running plans ({listed}): name the one to watch")
    return running[0]


async def _wake_on_changes(store: Store, plan_id: str, wake: asyncio.Event) -> None:
    async for _ in store.watch(f"{plans.TASKS}{plan_id}/"):
        wake.set()


async def _follow(store: Store, plan: Plan, wake: asyncio.Event, quiet: bool) -> list[dict]:
    shown: dict[str, tuple] = {}
    while True:
        wake.clear()
        tasks = [e.value for e in await plans.tasks(store, plan.id)]
        for task in tasks:
            key, state = f"{task['source']}/{task['container']}", (task["result"],
                                                                   task["destination"])
            if shown.get(key) != state and not quiet:
                console.print(f"  {key}: {task['result']} → {task['destination'] or '-'}")
            shown[key] = state
        current = await plans.load(store, plan.id)
        if current is None or current.state == plans.DONE or \
                all(t["result"] in plans.FINAL for t in tasks):
            return tasks
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_S):
                await wake.wait()


def outcome_of(task: dict) -> Outcome:
    return Outcome(task["container"], task["memory"], task["destination"], task["result"],
                   task["downtime_s"], task["attempts"])
