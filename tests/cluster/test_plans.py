"""Evacuation plans in a real etcd, run by PlanRunners whose local agents are fakes (the
runner's peer): the limits hold, a restarted runner finishes its former self's tasks."""

from __future__ import annotations

import asyncio
import time

import pytest

from godwit.cluster import plans
from godwit.cluster.membership import Registration
from godwit.cluster.plan_runner import LocalAgent, PlanRunner
from godwit.cluster.plans import Plan
from godwit.cluster.store import Store
from godwit.errors import GodwitError
from godwit.lab.etcd import EtcdCluster
from godwit.migration import MigrationOptions

pytestmark = pytest.mark.integration


class FakeAgent:
    """The host's own agent as the runner sees it (LocalAgent): migrations take `delay` s;
    containers in `containers` (name → status); a destination in `refusing` fails every
    migration."""

    def __init__(self, host: str, containers: dict[str, str], census: dict, *,
                 delay: float = 0.3, refusing: tuple[str, ...] = ()) -> None:
        self.host, self.containers, self.census = host, containers, census
        self.delay, self.refusing = delay, refusing

    async def status(self, name: str) -> str | None:
        return self.containers.get(name)

    async def migrate(self, name: str, options: MigrationOptions):
        self.census["now"] += 1
        self.census[self.host] = self.census.get(self.host, 0) + 1
        self.census["peak"] = max(self.census["peak"], self.census["now"])
        self.census[f"peak-{self.host}"] = max(self.census.get(f"peak-{self.host}", 0),
                                               self.census[self.host])
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.census["now"] -= 1
            self.census[self.host] -= 1
        ok = options.to not in self.refusing
        if ok:
            self.containers.pop(name)
        yield {"event": "result", "report": {"result": "ok" if ok else "failed",
                                             "downtime_s": 0.01,
                                             "error": None if ok else "refused"}}


async def _register(store: Store, names: list[str]) -> dict[str, Registration]:
    hosts = {n: Registration(store, n, {"address": f"{n}-addr:7070"}, ttl=5) for n in names}
    for host in hosts.values():
        await host.start()
    return hosts


async def _until_done(store: Store, plan_id: str, timeout: float = 40) -> list[dict]:
    deadline = time.monotonic() + timeout
    while (plan := await plans.load(store, plan_id)).state != plans.DONE:
        assert time.monotonic() < deadline, [e.value for e in await plans.tasks(store, plan.id)]
        await asyncio.sleep(0.2)
    return [e.value for e in await plans.tasks(store, plan_id)]


def _runner(store: Store, host: str, hosts: dict, agent: FakeAgent) -> PlanRunner:
    return PlanRunner(store, host, lambda: hosts[host].lease.id,
                      LocalAgent(agent.migrate, agent.status))


def test_plan_runs_within_its_limits(etcd: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            hosts = await _register(store, ["a", "b", "c", "d", "x"])
            census = {"now": 0, "peak": 0}
            agents = {h: FakeAgent(h, {f"{h}{i}": "running" for i in range(4)}, census,
                                   refusing=("x-addr:7070",)) for h in ("a", "b", "c")}
            runners = [_runner(store, h, hosts, agents[h]) for h in agents]
            for runner in runners:
                runner.start()
            plan = Plan(["a", "b", "c"], ["x", "d"], per_host=2, per_cluster=3,
                        options={"commit_timeout": 10})
            await plans.create(store, plan, [plans.new_task(h, c, 1, "x") for h in agents
                                             for c in agents[h].containers])
            with pytest.raises(GodwitError, match="a, b, c already being evacuated"):
                await plans.create(store, Plan(["a", "b", "c"], ["d"]), [])
            tasks = await _until_done(store, plan.id)
            for runner in runners:
                await runner.stop()
            assert {t["result"] for t in tasks} == {"ok"} and len(tasks) == 12
            assert {t["destination"] for t in tasks} == {"d"}  # x refused every one
            assert all([a["destination"] for a in t["attempts"]] == ["x", "d"] for t in tasks)
            assert 2 <= census["peak"] <= 3, census  # in parallel, within the cluster's limit
            assert max(census[f"peak-{h}"] for h in agents) <= 2, census  # the per-host one
            assert not await store.list(plans.SLOTS)
            assert not any(a.containers for a in agents.values())
            for host in hosts.values():
                await host.stop()

    asyncio.run(scenario())


def test_restarted_runner_finishes_the_tasks_it_was_running(etcd: EtcdCluster,
                                                            prefix: str) -> None:
    """Tasks left "running" by an agent that died: gone from the host → ok where it was
    going; still running here → migrated again; paused here → in doubt, left alone."""

    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            hosts = await _register(store, ["a", "b"])
            plan = Plan(["a"], ["b"])
            before = {"gone": None, "stayed": "running", "frozen": "paused"}
            tasks = []
            for name in before:
                task = plans.new_task("a", name, 1, "b")
                tasks.append({**task, "result": "running", "destination": "b"})
            await plans.create(store, plan, tasks)
            agent = FakeAgent("a", {n: s for n, s in before.items() if s}, {"now": 0,
                                                                            "peak": 0})
            runner = _runner(store, "a", hosts, agent)
            runner.start()
            done = {t["container"]: t for t in await _until_done(store, plan.id)}
            await runner.stop()
            assert done["gone"]["result"] == "ok" and done["gone"]["destination"] == "b"
            assert done["stayed"]["result"] == "ok" and "stayed" not in agent.containers
            assert done["frozen"]["result"] == "in-doubt"
            assert agent.containers == {"frozen": "paused"}
            for host in hosts.values():
                await host.stop()

    asyncio.run(scenario())
