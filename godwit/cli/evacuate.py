"""`godwit evacuate`: move every container off a host."""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack

import click
from msgspec.structs import replace
from rich.table import Table

from godwit.cli.common import Context, console, emit_json, json_option, plain_events, run
from godwit.cli.render import seconds, size
from godwit.errors import GodwitError
from godwit.evacuation import Outcome, Planner, evacuate, free_memory
from godwit.migration import MigrationOptions
from godwit.migration.strategies import STRATEGIES
from godwit.protocol import to_json

pass_ctx = click.make_pass_decorator(Context)
MOVABLE = ("running",)  # a paused container may be an in-doubt leftover: left alone


@click.command("evacuate")
@click.argument("host")
@click.option("--to", "targets", multiple=True,
              help="Destination host (repeatable) [default: every other configured host].")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True)
@click.option("--shared-storage", is_flag=True, help="Root filesystems are on shared storage.")
@click.option("--compress", is_flag=True, help="zstd-compress the transfers.")
@click.option("--bandwidth", type=float, help="Limit each migration to this many MB/s.")
@click.option("--commit-timeout", type=float, default=60.0, show_default=True)
@json_option
@pass_ctx
def evacuate_cmd(ctx: Context, host: str, targets: tuple[str, ...], parallel: int,
                 as_json: bool, bandwidth: float | None, **opts: object) -> None:
    """Migrate every container of HOST to other hosts, spread by free memory."""
    destinations = list(targets) or [h for h in ctx.host_names()
                                     if ctx.config.address(h) != ctx.config.address(host)]
    if not destinations:
        raise GodwitError("no destination host: pass --to")
    template = MigrationOptions(to="-", bandwidth_mbps=bandwidth, **opts)  # type: ignore[arg-type]
    outcomes = run(_evacuate(ctx, host, destinations, parallel, template, quiet=as_json))
    if as_json:
        emit_json([o.to_json() for o in outcomes])
    else:
        console.print(_outcome_table(outcomes))
    if any(o.result != "ok" for o in outcomes):
        sys.exit(1)


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
