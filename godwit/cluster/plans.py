"""Evacuation plans in etcd: written by the CLI, executed by the agents of the hosts emptied.

| key | holds |
|---|---|
| `plans/<id>` | the plan: hosts to empty, destinations, parallelism limits, options, state |
| `plan-tasks/<id>/<source>/<container>` | one container's progress (an evacuation Outcome) |
| `plan-slots/<id>/<n>` | one of the plan's `per_cluster` migration slots, on its agent's lease |

The CLI writes every task, then the plan key: agents act on a plan only once its key exists,
so a CLI that dies half-way leaves no half plan. Each task changes by compare-and-swap on its
whole value, so a restarted agent and its former self cannot both move a container. A slot
is held on the agent's host lease: an agent that dies frees its slots when the lease expires.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from godwit.cluster.store import Entry, Store
from godwit.errors import GodwitError

PLANS = "plans/"
TASKS = "plan-tasks/"
SLOTS = "plan-slots/"
RUNNING, DONE = "running", "done"
# An Outcome's results that end a task (anything else is "pending" or "running").
FINAL = ("ok", "failed", "in-doubt", "unknown", "no destination")


@dataclass
class Plan:
    """What the operator asked for. `per_host`: migrations at once out of one host (KubeVirt's
    parallelOutboundMigrationsPerNode); `per_cluster`: at once in the whole plan
    (parallelMigrationsPerCluster)."""

    hosts: list[str]
    destinations: list[str]
    per_host: int = 2
    per_cluster: int = 5
    options: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.time)
    state: str = RUNNING
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)


def task_key(plan_id: str, source: str, container: str) -> str:
    return f"{TASKS}{plan_id}/{source}/{container}"


def new_task(source: str, container: str, memory: int, planned: str) -> dict[str, Any]:
    """A task's first value: an evacuation Outcome's fields, its source and planned host."""
    return {"container": container, "memory": memory, "destination": None,
            "result": "pending", "downtime_s": None, "attempts": [], "source": source,
            "planned": planned, "updated": time.time()}


async def create(store: Store, plan: Plan, tasks: list[dict[str, Any]]) -> None:
    """Write the tasks, then the plan (which makes agents start)."""
    busy = {h for p in await active(store) for h in p.hosts} & set(plan.hosts)
    if busy:
        raise GodwitError(f"{', '.join(sorted(busy))} already being evacuated by a running "
                          f"plan: `godwit evacuate --watch` attaches to it")
    for task in tasks:
        await store.put(task_key(plan.id, task["source"], task["container"]), task)
    await store.put(PLANS + plan.id, plan.to_json())


async def load(store: Store, plan_id: str) -> Plan | None:
    entry = await store.get(PLANS + plan_id)
    return Plan.from_json(entry.value) if entry else None


async def every(store: Store) -> list[Plan]:
    """Every plan, oldest first."""
    plans = [Plan.from_json(e.value) for e in await store.list(PLANS)]
    return sorted(plans, key=lambda p: p.created)


async def active(store: Store) -> list[Plan]:
    return [p for p in await every(store) if p.state == RUNNING]


async def tasks(store: Store, plan_id: str, source: str | None = None) -> list[Entry]:
    """A plan's tasks (only one source host's if given), in key order."""
    return await store.list(f"{TASKS}{plan_id}/" + (f"{source}/" if source else ""))


async def update_task(store: Store, entry: Entry, **changes: Any) -> Entry | None:
    """Change a task if nobody changed it since `entry` was read; the new entry, or None."""
    value = {**entry.value, **changes, "updated": time.time()}
    reply = await store.txn([store.same_value(entry.key, entry.value)],
                            [store.op_put(entry.key, value)], [store.op_get(entry.key)])
    current = store.entry_of(reply.responses[0]) if not reply.succeeded else None
    if reply.succeeded or (current and current.value == value):  # a retry of our own write
        return Entry(entry.key, value, entry.create_revision, reply.header.revision,
                     entry.lease)
    return None


async def finish_if_complete(store: Store, plan: Plan) -> bool:
    """Mark the plan done once every task is final (any agent may; the CAS makes it once)."""
    if any(e.value["result"] not in FINAL for e in await tasks(store, plan.id)):
        return False
    entry = await store.get(PLANS + plan.id)
    if entry is None or entry.value["state"] != RUNNING:
        return entry is not None
    done = {**entry.value, "state": DONE, "finished": time.time()}
    await store.txn([store.same_value(entry.key, entry.value)], [store.op_put(entry.key, done)])
    return True


async def take_slot(store: Store, plan: Plan, lease: int, holder: dict[str, Any]) -> str | None:
    """One of the plan's free migration slots, held on `lease`; None if all are taken (one
    read, then a transaction per slot that read free: a waiting agent costs little)."""
    taken = {e.key for e in await store.list(f"{SLOTS}{plan.id}/")
             if not (e.lease == lease and e.value == holder)}
    for n in range(plan.per_cluster):
        key = f"{SLOTS}{plan.id}/{n}"
        if key in taken:
            continue
        reply = await store.txn([store.absent(key)], [store.op_put(key, holder, lease=lease)],
                                [store.op_get(key)])
        held = store.entry_of(reply.responses[0]) if not reply.succeeded else None
        if reply.succeeded or (held and held.lease == lease and held.value == holder):
            return key
    return None


async def free_slot(store: Store, key: str) -> None:
    await store.delete(key)
