"""`godwit evacuate`: move every container off a host (in cluster mode, off hosts, through a
plan in etcd that the agents execute)."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack

import click
from msgspec.structs import replace
from rich.table import Table

from godwit.cli.common import Context, console, emit_json, json_option, plain_events, run
from godwit.cli.evacuate_plan import MOVABLE, outcome_of, start_plan, watch_plan
from godwit.cli.render import seconds, size
from godwit.errors import GodwitError
from godwit.evacuation import Outcome, Planner, evacuate, free_memory
from godwit.migration import MigrationOptions
from godwit.migration.strategies import STRATEGIES
from godwit.protocol import to_json

pass_ctx = click.make_pass_decorator(Context)


@click.command("evacuate")
@click.argument("hosts", nargs=-1)
@click.option("--to", "targets", multiple=True,
              help="Destination host (repeatable) [default: every other configured host].")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Migrations at once out of one host.")
@click.option("--cluster-parallel", type=click.IntRange(1, 64), default=5, show_default=True,
              help="Cluster mode: migrations at once in the whole plan.")
@click.option("--watch", is_flag=True,
              help="Cluster mode: attach to a running plan (HOSTS: its id, if several run).")
@click.option("--detach", is_flag=True, help="Cluster mode: write the plan and return.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True)
@click.option("--shared-storage", is_flag=True, help="Root filesystems are on shared storage.")
@click.option("--compress", is_flag=True, help="zstd-compress the transfers.")
@click.option("--bandwidth", type=float, help="Limit each migration to this many MB/s.")
@click.option("--eager-restore", is_flag=True,
              help="Stop-and-copy: copy the memory into the restored process before it "
                   "resumes (a longer freeze), instead of right after.")
@click.option("--commit-timeout", type=float, default=60.0, show_default=True)
@json_option
@pass_ctx
def evacuate_cmd(ctx: Context, hosts: tuple[str, ...], targets: tuple[str, ...],
                 parallel: int, cluster_parallel: int, watch: bool, detach: bool,
                 as_json: bool, bandwidth: float | None, **opts: object) -> None:
    """Migrate every container of HOSTS to other hosts, spread by free memory. Standalone:
    one host, driven by this command. Cluster mode: a plan in etcd that the agents execute
    (this command only follows it; killing it does not stop the plan)."""
    template = MigrationOptions(to="-", bandwidth_mbps=bandwidth, **opts)  # type: ignore[arg-type]
    if ctx.config.etcd:
        outcomes = _cluster_evacuation(ctx, list(hosts), list(targets), parallel,
                                       cluster_parallel, template, watch, detach, as_json)
        if outcomes is None:
            return
    else:
        outcomes = _standalone(ctx, hosts, targets, parallel, template, watch or detach,
                               as_json)
    if as_json:
        emit_json([o.to_json() for o in outcomes])
    else:
        console.print(_outcome_table(outcomes))
    if any(o.result != "ok" for o in outcomes):
        sys.exit(1)


def _cluster_evacuation(ctx: Context, hosts: list[str], targets: list[str], per_host: int,
                        per_cluster: int, template: MigrationOptions, watch: bool,
                        detach: bool, quiet: bool) -> list[Outcome] | None:
    if watch:
        if len(hosts) > 1:
            raise GodwitError("--watch takes at most one plan id")
        plan_id = hosts[0] if hosts else None
    else:
        if not hosts:
            raise GodwitError("name the host(s) to evacuate, or --watch a running plan")
        plan = run(start_plan(ctx, hosts, targets, per_host, per_cluster, template))
        if detach:
            if quiet:
                emit_json({"plan": plan.id})
            else:
                console.print(f"plan {plan.id} started")
            return None
        plan_id = plan.id
    return [outcome_of(t) for t in run(watch_plan(ctx, plan_id, quiet))]


def _standalone(ctx: Context, hosts: tuple[str, ...], targets: tuple[str, ...],
                parallel: int, template: MigrationOptions, cluster_only: bool,
                quiet: bool) -> list[Outcome]:
    if cluster_only:
        raise GodwitError("--watch and --detach need cluster mode (`godwit use-etcd`)")
    if len(hosts) != 1:
        raise GodwitError("standalone mode evacuates one host at a time")
    host = hosts[0]
    destinations = list(targets) or [h for h in ctx.host_names()
                                     if ctx.config.address(h) != ctx.config.address(host)]
    if not destinations:
        raise GodwitError("no destination host: pass --to")
    return run(_evacuate(ctx, host, destinations, parallel, template, quiet=quiet))


async def _evacuate(ctx: Context, host: str, destinations: list[str], parallel: int,
                    template: MigrationOptions, quiet: bool) -> list[Outcome]:
    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(ctx.client(host, timeout=600))
        dests = {d: await stack.enter_async_context(ctx.client(d, timeout=10))
                 for d in destinations}
        rows = [to_json(c) for c in await source.containers() if c.status in MOVABLE]
        planner = Planner(await free_memory(dests))
        if not planner.free:
            raise GodwitError("no destination host is reachable")

        def migrate(name: str, dest: str):
            return plain_events(source.migrate(name, replace(template,
                                                             to=ctx.config.address(dest))))

        def show(outcome: Outcome) -> None:
            if not quiet:
                console.print(f"  {outcome.container}: {outcome.result}"
                              f" → {outcome.destination or '-'}")

        if not quiet:
            console.print(f"evacuating {len(rows)} container(s) from {host} to "
                          f"{', '.join(planner.free)} ({parallel} at a time)")
        return await evacuate(rows, planner, migrate, parallel, show)


def _outcome_table(outcomes: list[Outcome]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("CONTAINER", "MEMORY", "RESULT", "NOW ON", "DOWNTIME", "ATTEMPTS"):
        table.add_column(column)
    for o in outcomes:
        tries = ", ".join(f"{a['destination']}:{a['result']}" for a in o.attempts)
        table.add_row(o.container, size(o.memory), o.result, o.destination or "source",
                      seconds(o.downtime_s), tries)
    return table
