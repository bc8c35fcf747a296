"""Container commands: run, ps, exec, kill, rm, migrate, history, report."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from godwit.api import AgentClient
from godwit.cli.cluster import cluster_history
from godwit.cli.common import (
    Context,
    console,
    emit_json,
    err_console,
    gather_hosts,
    json_option,
    locate,
    plain_events,
    plain_history,
    run,
)
from godwit.cli.render import containers_table, findings_table, follow_migration, report_table
from godwit.errors import GodwitError
from godwit.image_config import Overrides
from godwit.images import absolute_reference
from godwit.migration import MigrationOptions
from godwit.migration.strategies import STRATEGIES
from godwit.network import ContainerNet
from godwit.protocol import ContainerInfo, MigrationLogs, PreflightRequest, convert, to_json

T = TypeVar("T")
pass_ctx = click.make_pass_decorator(Context)
host_option = click.option("--host", "-H", help="Host name from the config, or ADDR:PORT.")


@click.command("run")
@click.argument("name")
@click.option("--bundle", type=click.Path(file_okay=False),
              help="OCI bundle directory (config.json + rootfs) on the host.")
@click.option("--image", help="Image on the host: oci:DIR[:TAG] or docker-archive:FILE.")
@click.option("--env", "-e", multiple=True, metavar="K=V",
              help="With --image: set an environment variable (repeatable).")
@click.option("--user", "-u", help="With --image: run as user[:group] or uid[:gid].")
@click.option("--workdir", "-w", help="With --image: the working directory.")
@click.option("--ip", help="Give the container this address (CIDR) on the host bridge.")
@click.option("--gateway", help="Default gateway of the container (with --ip).")
@click.argument("args", nargs=-1)
@host_option
@json_option
@pass_ctx
def run_cmd(ctx: Context, name: str, bundle: str | None, image: str | None,
            env: tuple[str, ...], user: str | None, workdir: str | None,
            args: tuple[str, ...], ip: str | None, gateway: str | None, host: str | None,
            as_json: bool) -> None:
    """Start container NAME from a bundle or an image on a host (stdio is /dev/null).
    With --image, ARGS (after --) replace the image's Cmd."""
    target = host or _only_host(ctx)
    if gateway and not ip:
        raise GodwitError("--gateway needs --ip")
    if bool(bundle) == bool(image):
        raise GodwitError("give either --bundle DIR or --image REF")
    if bundle and (env or user or workdir or args):
        raise GodwitError("--env, --user, --workdir and ARGS go with --image only")
    net = convert({"ip": ip, "gateway": gateway}, ContainerNet, "--ip/--gateway") if ip else None
    overrides = Overrides(env, user, workdir, args or None)

    async def go() -> ContainerInfo:
        async with ctx.client(target, timeout=600) as agent:
            if image:
                return await agent.run_image(name, absolute_reference(image), overrides, net)
            return await agent.run(name, str(Path(bundle or "").resolve()), net)

    result = run(go())
    if as_json:
        emit_json(to_json(result))
    else:
        console.print(f"{name} running on {result.host}" + (
            f" (image {result.image}, {result.image_digest})" if image else ""),
            markup=False, soft_wrap=True)


def _only_host(ctx: Context) -> str:
    hosts = ctx.host_names()
    if len(hosts) > 1:
        raise GodwitError("several hosts configured: choose one with --host")
    return hosts[0]


@click.command("ps")
@host_option
@json_option
@pass_ctx
def ps_cmd(ctx: Context, host: str | None, as_json: bool) -> None:
    """List containers on every configured host."""
    found = run(gather_hosts(ctx, [host] if host else ctx.host_names(),
                             lambda a: a.containers()))
    rows = [to_json(row) for r in found.values() if isinstance(r, list) for row in r]
    errors = {h: str(r) for h, r in found.items() if isinstance(r, GodwitError)}
    if as_json:
        emit_json({"containers": rows, "errors": errors})
    else:
        console.print(containers_table(rows))
        for h, message in errors.items():
            err_console.print(f"warning: {h}: {message}")
    if errors and not rows:
        sys.exit(1)


def on_container(ctx: Context, name: str, host: str | None,
                 call: Callable[[AgentClient], Awaitable[T]]) -> T:
    """Ask the agent of the host that runs container NAME (found when --host is not given)."""

    async def go() -> T:
        async with ctx.client(host or await locate(ctx, name)) as agent:
            return await call(agent)

    return run(go())


@click.command("exec")
@click.argument("name")
@click.argument("argv", nargs=-1, required=True)
@host_option
@pass_ctx
def exec_cmd(ctx: Context, name: str, argv: tuple[str, ...], host: str | None) -> None:
    """Run a command inside container NAME and print its output."""
    result = on_container(ctx, name, host, lambda agent: agent.exec(name, list(argv)))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.exit(result.exit_code)


@click.command("kill")
@click.argument("name")
@click.option("--signal", "-s", default="TERM", show_default=True)
@host_option
@pass_ctx
def kill_cmd(ctx: Context, name: str, signal: str, host: str | None) -> None:
    """Send a signal to the init process of container NAME."""
    on_container(ctx, name, host, lambda agent: agent.signal(name, signal))


@click.command("resume")
@click.argument("name")
@host_option
@pass_ctx
def resume_cmd(ctx: Context, name: str, host: str | None) -> None:
    """Resume a paused container (a migration that ended in doubt leaves it paused)."""
    result = on_container(ctx, name, host, lambda agent: agent.resume(name))
    console.print(f"{name} {result.status} on {result.host}")


@click.command("rm")
@click.argument("name")
@host_option
@pass_ctx
def rm_cmd(ctx: Context, name: str, host: str | None) -> None:
    """Kill and remove container NAME."""
    on_container(ctx, name, host, lambda agent: agent.remove(name))
    console.print(f"{name} removed")


@click.command("migrate")
@click.argument("name")
@click.option("--to", "to", required=True, help="Destination host (name or ADDR:PORT).")
@click.option("--from", "source", help="Source host; found automatically when omitted.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True)
@click.option("--shared-storage", is_flag=True,
              help="The rootfs is on storage both hosts see at the same path: do not copy it.")
@click.option("--compress", is_flag=True, help="zstd-compress the transfer.")
@click.option("--bandwidth", type=float, help="Limit the transfer to this many MB/s.")
@click.option("--eager-restore", is_flag=True,
              help="Stop-and-copy: copy the memory into the restored process before it "
                   "resumes (a longer freeze), instead of right after.")
@click.option("--commit-timeout", type=float, default=60.0, show_default=True,
              help="Seconds the destination waits for the commit before fencing its copy.")
@click.option("--max-clock-skew", type=float, default=0.5, show_default=True,
              help="Refuse when the hosts' clocks differ by more than this many seconds.")
@click.option("--max-freeze", type=float,
              help="Seconds the container may stay frozen before the migration is given up "
                   "and the container resumed [default: 30 + its memory at 100 MB/s].")
@click.option("--progress-timeout", type=float, default=30.0, show_default=True,
              help="Before the freeze: give up when a step makes no progress for this many "
                   "seconds (no byte moves, no step begins).")
@json_option
@pass_ctx
def migrate_cmd(ctx: Context, name: str, to: str, source: str | None, as_json: bool,
                **opts: object) -> None:
    """Live-migrate container NAME to another host."""
    options = MigrationOptions(to=ctx.config.address(to), bandwidth_mbps=opts.pop("bandwidth"),
                               **opts)  # type: ignore[arg-type]
    report = run(_migrate(ctx, name, source, options, quiet=as_json))
    if as_json:
        emit_json(report)
    else:
        console.print(report_table(report))
    if report.get("result") != "ok":
        if not as_json:
            err_console.print(f"error: migration failed: {report.get('error')}; "
                              f"container {report.get('outcome')}")
        sys.exit(1)


async def _migrate(ctx: Context, name: str, source: str | None,
                   options: MigrationOptions, quiet: bool) -> dict:
    source = source or await locate(ctx, name)
    if ctx.config.address(source) == options.to:
        raise GodwitError(f"container {name} is already on {source}")
    async with ctx.client(options.to, timeout=10) as dest:
        await dest.info()
    async with ctx.client(source, timeout=600) as agent:
        events = plain_events(agent.migrate(name, options))
        if quiet:
            return [e async for e in events if e["event"] == "result"][-1]["report"]
        console.print(f"migrating {name}: {source} → {ctx.config.name_of(options.to)}")
        return await follow_migration(events)


@click.command("history")
@host_option
@json_option
@pass_ctx
def history_cmd(ctx: Context, host: str | None, as_json: bool) -> None:
    """Migrations recorded by the source agents (in cluster mode: every host's, from etcd;
    only those out of HOST with --host)."""
    if ctx.config.etcd:
        reports = run(cluster_history(ctx, host))
    else:
        found = run(gather_hosts(ctx, [host] if host else ctx.host_names(), plain_history))
        reports = sorted((r for v in found.values() if isinstance(v, list) for r in v),
                         key=lambda r: r["started_at"])
    if as_json:
        emit_json(reports)
        return
    from rich.table import Table

    from godwit.cli.render import seconds, size

    table = Table(box=None, header_style="bold")
    for column in ("ID", "CONTAINER", "ROUTE", "STRATEGY", "RESULT", "DOWNTIME", "BYTES"):
        table.add_column(column)
    for r in reports:
        table.add_row(r["id"][:8], r["container"], f"{r['source']} → {r['destination']}",
                      r["strategy"], r["result"], seconds(r.get("downtime_s")),
                      size(r.get("image_bytes", 0) + r.get("rootfs_bytes", 0)))
    console.print(table)


@click.command("report")
@click.argument("migration_id")
@host_option
@click.option("--png", type=click.Path(dir_okay=False), help="Also draw a timeline PNG here.")
@click.option("--logs", "show_logs", is_flag=True,
              help="Print the CRIU/runc logs both hosts kept of this (failed) migration.")
@json_option
@pass_ctx
def report_cmd(ctx: Context, migration_id: str, host: str | None, png: str | None,
               show_logs: bool, as_json: bool) -> None:
    """Print the report of one migration (an ID prefix is enough)."""
    found = run(gather_hosts(ctx, [host] if host else ctx.host_names(), plain_history))
    matches = [r for v in found.values() if isinstance(v, list) for r in v
               if r["id"].startswith(migration_id)]
    if len(matches) != 1:
        raise GodwitError(f"{'no' if not matches else 'several'} migrations match {migration_id}")
    if show_logs:
        print_logs(ctx, matches[0], as_json)
        return
    emit_json(matches[0]) if as_json else console.print(report_table(matches[0]))
    if png:
        from godwit.plot import timeline_png

        timeline_png(matches[0], Path(png))
        if not as_json:
            console.print(f"timeline written to {png}")


def print_logs(ctx: Context, report: dict, as_json: bool) -> None:
    """The logs every configured host kept of a migration (its source and destination),
    a header per file; as plain text, not through rich (a log is no markup)."""
    found = run(gather_hosts(ctx, ctx.host_names(), lambda a: a.migration_logs(report["id"])))
    roles = {report["source"]: "source", report["destination"]: "destination"}
    kept = {r.host: to_json(r.logs) for r in found.values()
            if isinstance(r, MigrationLogs) and r.logs}
    kept = dict(sorted(kept.items(), key=lambda item: roles.get(item[0]) != "source"))
    down = [h for h, r in found.items() if isinstance(r, GodwitError)]
    hint = f" (unreachable: {', '.join(down)})" if down else ""
    if not kept:
        raise GodwitError(f"no logs kept of migration {report['id'][:8]} ({report['result']}; "
                          f"hosts keep those of failed migrations only){hint}")
    if as_json:
        emit_json(kept)
        return
    for agent, logs in kept.items():
        for entry in logs:
            role = roles.get(agent, "host")
            sys.stdout.write(f"==> {role} {agent}: {entry['name']} ({entry['size']} bytes) <==\n")
            sys.stdout.write(entry["text"] if entry["text"].endswith("\n") or not entry["text"]
                             else entry["text"] + "\n")
    if down:
        err_console.print(f"warning: logs of unreachable hosts missing: {', '.join(down)}")


@click.command("check")
@click.argument("host")
@click.option("--from", "sources", multiple=True,
              help="Source host(s) [default: every other configured host].")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True)
@click.option("--container", help="Size the memory/disk checks for this container.")
@json_option
@pass_ctx
def check_cmd(ctx: Context, host: str, sources: tuple[str, ...], strategy: str,
              container: str | None, as_json: bool) -> None:
    """Pre-flight checks for migrations to HOST: CRIU/runc, CPU, clocks, resources."""
    target = ctx.config.address(host)
    origins = list(sources) or [h for h in ctx.host_names() if ctx.config.address(h) != target]
    if not origins:
        raise GodwitError("no source host to check from: pass --from")
    body = PreflightRequest(to=target, strategy=strategy, container=container)
    found = {h: r if isinstance(r, GodwitError) else to_json(r) for h, r in
             run(gather_hosts(ctx, origins, lambda a: a.preflight(body))).items()}
    if as_json:
        emit_json({h: ({"error": str(r)} if isinstance(r, GodwitError) else r)
                   for h, r in found.items()})
    else:
        console.print(findings_table(found))
    failed = [r for r in found.values() if isinstance(r, GodwitError)
              or any(f["level"] == "error" for f in r["findings"])]
    if failed:
        sys.exit(1)


COMMANDS = (run_cmd, ps_cmd, exec_cmd, kill_cmd, resume_cmd, rm_cmd, migrate_cmd,
            history_cmd, report_cmd, check_cmd)
