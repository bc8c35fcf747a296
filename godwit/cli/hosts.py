"""Host commands: hosts (list with live facts), hosts add, hosts rm."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from godwit.cli.common import Context, console, emit_json, gather_hosts, json_option, run
from godwit.cli.render import size
from godwit.cluster.node import registered_hosts
from godwit.cluster.store import parse_endpoints
from godwit.errors import GodwitError
from godwit.protocol import to_json

pass_ctx = click.make_pass_decorator(Context)


@click.group("hosts", invoke_without_command=True)
@json_option
@click.pass_context
def hosts(click_ctx: click.Context, as_json: bool) -> None:
    """List configured hosts (in cluster mode: the hosts registered in etcd) with what
    their agents report."""
    if click_ctx.invoked_subcommand:
        return
    ctx: Context = click_ctx.obj
    if ctx.config.etcd:
        ctx.config.hosts = run(registered_addresses(ctx))
    names = ctx.host_names()
    found = {h: r if isinstance(r, GodwitError) else to_json(r)
             for h, r in run(gather_hosts(ctx, names, lambda a: a.info())).items()}
    if as_json:
        emit_json({h: ({"error": str(r)} if isinstance(r, GodwitError) else r)
                   for h, r in found.items()})
    else:
        console.print(_hosts_table(ctx, found))
    if all(isinstance(r, GodwitError) for r in found.values()):
        sys.exit(1)


async def registered_addresses(ctx: Context) -> dict[str, str]:
    """Name → address of every live host registered in etcd (cluster mode)."""
    files = ctx.tls_files()
    if files is None:
        raise GodwitError("cluster mode needs the CLI's TLS files: `godwit use-tls`")
    registered = await registered_hosts(ctx.config.etcd, files)
    if not registered:
        raise GodwitError(f"no host is registered in etcd at {ctx.config.etcd}")
    return {name: info["address"] for name, info in sorted(registered.items())}


def _hosts_table(ctx: Context, found: dict) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("HOST", "ADDRESS", "STATE", "CONTAINERS", "CRIU", "RUNC", "LAZY",
                   "MEM FREE", "CERT/CRL DAYS"):
        table.add_column(column)
    for host, info in found.items():
        address = ctx.config.hosts.get(host, host)
        if isinstance(info, GodwitError):
            table.add_row(host, address, f"[red]down[/]: {info}", "", "", "", "", "", "")
            continue
        criu = info.get("criu") or {}
        table.add_row(host, address, "[green]up[/]", str(info["containers"]),
                      criu.get("version", "?") + ("" if criu.get("check_ok") else " (broken)"),
                      str(info.get("runc", "?")), "yes" if _lazy_pages(info) else "no",
                      size(info["mem_available"]), _days_left(info.get("tls")))
    return table


def _days_left(tls: dict | None) -> str:
    """`cert/crl` days left before the agent's certificate expires and its CRL is stale;
    red under a week (agents refuse every peer once their CRL has expired)."""
    if not tls:
        return "-"
    days = [tls.get("certificate_days_left"), tls.get("crl_days_left")]
    text = "/".join("?" if d is None else str(d) for d in days)
    return f"[red]{text}[/]" if any(d is not None and d < 7 for d in days) else text


def _lazy_pages(info: dict) -> bool:
    """Post-copy can restore here: CRIU has lazy pages and runc `restore --lazy-pages`."""
    runc = info.get("runc_features") or {"lazy_restore": True}
    return bool((info.get("criu") or {}).get("lazy_pages") and runc.get("lazy_restore"))


@hosts.command("add")
@click.argument("name")
@click.argument("address")
@pass_ctx
def hosts_add(ctx: Context, name: str, address: str) -> None:
    """Remember host NAME at ADDRESS (host[:port])."""
    ctx.config.add_host(name, address)
    ctx.config.save()
    console.print(f"{name} = {ctx.config.hosts[name]}")


@hosts.command("rm")
@click.argument("name")
@pass_ctx
def hosts_rm(ctx: Context, name: str) -> None:
    """Forget host NAME."""
    ctx.config.remove_host(name)
    ctx.config.save()


@click.command("use-etcd")
@click.argument("urls", required=False)
@pass_ctx
def use_etcd(ctx: Context, urls: str | None) -> None:
    """Cluster mode: read hosts from etcd at URLS (https://ADDR:PORT, comma-separated);
    without URLS, back to standalone mode (hosts from this config)."""
    if urls:
        parse_endpoints(urls)
    ctx.config.etcd = urls or None
    ctx.config.save()
    console.print(f"hosts from etcd at {urls}" if urls else "standalone: hosts from the config")


@click.command("use-tls")
@click.option("--ca", "ca", required=True, type=click.Path(dir_okay=False, exists=True),
              help="godwit CA certificate.")
@click.option("--cert", required=True, type=click.Path(dir_okay=False, exists=True),
              help="Your operator certificate (godwit ca issue NAME --role operator).")
@click.option("--key", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--crl", type=click.Path(dir_okay=False, exists=True),
              help="The CA's CRL, to refuse revoked agents.")
@pass_ctx
def use_tls(ctx: Context, ca: str, cert: str, key: str, crl: str | None) -> None:
    """Make the CLI present this certificate to agents (stored in the CLI config)."""
    files = {"ca": ca, "cert": cert, "key": key, "crl": crl}
    ctx.config.tls = {k: str(Path(v).resolve()) for k, v in files.items() if v}
    ctx.config.save()
    console.print(f"CLI will use {ctx.config.tls['cert']} ({ctx.config.path})")


COMMANDS = (hosts, use_etcd, use_tls)
