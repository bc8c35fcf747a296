"""Evacuation: move every container off a host, spread over destinations by free memory.

Each container is one ordinary migration (with its own safety net), at most `parallel` at a
time. A container whose migration fails is tried on the next destination; a destination
that cannot be reached is dropped for the rest of the evacuation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

from godwit.api import AgentClient, AgentUnreachable
from godwit.errors import Conflict, GodwitError

MigrateFn = Callable[[str, str], AsyncIterator[dict]]


@dataclass
class Outcome:
    """What happened to one container."""

    container: str
    memory: int
    destination: str | None = None
    result: str = "pending"
    downtime_s: float | None = None
    attempts: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Planner:
    """Picks the destination with the most free memory left, net of what it was given."""

    def __init__(self, free_memory: dict[str, int]) -> None:
        self.free = dict(free_memory)
        self.down: set[str] = set()

    def pick(self, memory: int, exclude: set[str]) -> str | None:
        candidates = [d for d in self.free if d not in exclude | self.down]
        if not candidates:
            return None
        best = max(candidates, key=lambda d: self.free[d])
        self.free[best] -= memory
        return best

    def give_back(self, destination: str, memory: int) -> None:
        self.free[destination] += memory


async def free_memory(clients: dict[str, AgentClient]) -> dict[str, int]:
    """Free memory of each reachable destination."""

    async def ask(name: str, client: AgentClient) -> tuple[str, int | None]:
        try:
            return name, (await client.info()).mem_available
        except GodwitError:
            return name, None

    answers = await asyncio.gather(*(ask(n, c) for n, c in clients.items()))
    return {name: mem for name, mem in answers if mem is not None}


async def evacuate(containers: list[dict], planner: Planner, migrate: MigrateFn,
                   parallel: int, on_update: Callable[[Outcome], None] | None = None
                   ) -> list[Outcome]:
    """Migrate the given containers (`ps` rows) concurrently; never raises per container."""
    gate = asyncio.Semaphore(parallel)
    ordered = sorted(containers, key=lambda c: c.get("memory", 0), reverse=True)
    outcomes = [Outcome(c["name"], int(c.get("memory", 0))) for c in ordered]

    async def move(outcome: Outcome) -> None:
        async with gate:
            await _move_one(outcome, planner, migrate)
        if on_update:
            on_update(outcome)

    await asyncio.gather(*(move(o) for o in outcomes))
    return outcomes


async def _move_one(outcome: Outcome, planner: Planner, migrate: MigrateFn) -> None:
    tried: set[str] = set()
    while (destination := planner.pick(outcome.memory, tried)) is not None:
        tried.add(destination)
        report = await attempt(outcome.container, destination, migrate)
        outcome.attempts.append({"destination": destination, "result": report.get("result"),
                                 "error": report.get("error")})
        if report.get("result") == "ok":
            outcome.destination, outcome.result = destination, "ok"
            outcome.downtime_s = report.get("downtime_s")
            return
        planner.give_back(destination, outcome.memory)
        if report.get("result") == "in-doubt" or report.get("source_lost"):
            outcome.result = "unknown" if report.get("source_lost") else "in-doubt"
            return
        if destination_down(report):
            planner.down.add(destination)
    outcome.result = "failed" if outcome.attempts else "no destination"


async def attempt(name: str, destination: str, migrate: MigrateFn) -> dict:
    try:
        results = [e async for e in migrate(name, destination) if e["event"] == "result"]
    except AgentUnreachable as exc:  # the source agent itself: the migration's fate is its own
        return {"result": "failed", "error": str(exc), "source_lost": True}
    except GodwitError as exc:  # a Conflict: the source refused, the container is busy
        return {"result": "failed", "error": str(exc), "refused": isinstance(exc, Conflict)}
    return results[-1]["report"] if results else {"result": "failed", "error": "no report"}


def destination_down(report: dict) -> bool:
    """Errors in a source agent's report are about its peer, the destination."""
    return "cannot connect" in (report.get("error") or "")
