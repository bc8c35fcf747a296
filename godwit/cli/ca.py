"""`godwit ca …`: manage the godwit certificate authority."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table

from godwit.pki import CRL_DAYS, CertificateAuthority, IssuedCert, PKIError

DEFAULT_CA_DIR = "/etc/godwit/ca"

F = TypeVar("F", bound=Callable[..., Any])


class CAError(click.ClickException):
    """A one-line ``error: …`` on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _handle_errors(fn: F) -> F:
    """Turn PKI and OS failures into one-line errors (never a traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PKIError as e:
            raise CAError(str(e)) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise CAError(f"{e.strerror or e}{where}") from None

    return wrapper  # type: ignore[return-value]


def _ca(ctx: click.Context) -> CertificateAuthority:
    return CertificateAuthority(ctx.obj["ca_dir"])


def _emit(as_json: bool, data: Any, human: Callable[[Console], None]) -> None:
    """Print ``data`` as JSON, or call ``human`` with a rich console."""
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human(Console(file=sys.stdout))


def _table(certs: list[IssuedCert]) -> Table:
    """Certificates, serials in full (``revoke`` takes them)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("name", "kind", "status", "not after", "serial", "SANs"):
        table.add_column(name, no_wrap=name != "SANs", overflow="fold")
    for c in certs:
        status, sans = "revoked" if c.revoked else "valid", ", ".join(c.sans) or "-"
        row = (c.name, c.kind, status, f"{c.not_after:%Y-%m-%d}", c.serial, sans)
        table.add_row(*row, style="red" if c.revoked else None)
    return table


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
days_option = click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)


@click.group()
@click.option(
    "--ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: os.environ.get("GODWIT_CA_DIR", DEFAULT_CA_DIR),
    show_default=f"$GODWIT_CA_DIR or {DEFAULT_CA_DIR}",
    help="Directory of the CA.",
)
@click.pass_context
def ca(ctx: click.Context, ca_dir: Path) -> None:
    """Manage the godwit certificate authority (mutual TLS between agents and the CLI)."""
    ctx.ensure_object(dict)
    ctx.obj["ca_dir"] = Path(ca_dir)


@ca.command()
@click.option("--name", default="godwit CA", show_default=True, help="CA subject CN.")
@click.option("--days", type=click.IntRange(min=1), default=3650, show_default=True)
@json_option
@click.pass_context
@_handle_errors
def init(ctx: click.Context, name: str, days: int, as_json: bool) -> None:
    """Create a new CA (refuses to overwrite an existing one)."""
    authority = _ca(ctx)
    cert = authority.init(name, days)
    data = {
        "ca_dir": str(authority.dir),
        "ca_cert": str(authority.ca_cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    _emit(as_json, data, lambda c: c.print(f"CA created in {authority.dir}"))


def _print_issued(as_json: bool, authority: CertificateAuthority, cert: IssuedCert) -> None:
    files = authority.bundle_for(cert.name)
    paths = {k: str(v) for k, v in vars(files).items()}
    data = cert.to_json() | {"files": paths}

    def human(console: Console) -> None:
        console.print(_table([cert]))
        console.print(f"cert {files.cert}\nkey  {files.key}\nca   {files.ca}\ncrl  {files.crl}")

    _emit(as_json, data, human)


@ca.command()
@click.argument("host")
@click.option("--san", "sans", multiple=True, help="DNS name or IP address (repeatable).")
@days_option
@json_option
@click.pass_context
@_handle_errors
def issue(ctx: click.Context, host: str, sans: tuple[str, ...], days: int, as_json: bool) -> None:
    """Issue an agent certificate for HOST (SANs default to HOST itself)."""
    authority = _ca(ctx)
    cert = authority.issue_agent(host, list(sans) or [host], days)
    _print_issued(as_json, authority, cert)


@ca.command("issue-client")
@click.argument("name")
@days_option
@json_option
@click.pass_context
@_handle_errors
def issue_client(ctx: click.Context, name: str, days: int, as_json: bool) -> None:
    """Issue an operator (client-only) certificate."""
    authority = _ca(ctx)
    _print_issued(as_json, authority, authority.issue_client(name, days))


@ca.command()
@click.argument("name")
@days_option
@json_option
@click.pass_context
@_handle_errors
def renew(ctx: click.Context, name: str, days: int, as_json: bool) -> None:
    """New key and certificate for NAME; the previous one stays valid until revoked."""
    authority = _ca(ctx)
    _print_issued(as_json, authority, authority.renew(name, days))


@ca.command()
@click.argument("serial_or_name", metavar="SERIAL|NAME")
@json_option
@click.pass_context
@_handle_errors
def revoke(ctx: click.Context, serial_or_name: str, as_json: bool) -> None:
    """Revoke a certificate by serial, or all certificates of NAME; rewrites the CRL."""
    authority = _ca(ctx)
    certs = authority.revoke(serial_or_name)
    data = {"revoked": [c.to_json() for c in certs], "crl": str(authority.crl)}

    def human(console: Console) -> None:
        console.print(_table(certs))
        console.print(f"copy {authority.crl} to every agent (picked up without restart)")

    _emit(as_json, data, human)


@ca.command()
@click.option("--days", type=click.IntRange(min=1), default=CRL_DAYS, show_default=True)
@json_option
@click.pass_context
@_handle_errors
def crl(ctx: click.Context, days: int, as_json: bool) -> None:
    """Re-sign the CRL with a new next-update date (agents refuse peers once it expires)."""
    authority = _ca(ctx)
    next_update = authority.refresh_crl(days)
    data = {"crl": str(authority.crl), "next_update": next_update.isoformat()}
    _emit(as_json, data, lambda c: c.print(f"{authority.crl} valid until {next_update:%Y-%m-%d}"))


@ca.command("list")
@json_option
@click.pass_context
@_handle_errors
def list_(ctx: click.Context, as_json: bool) -> None:
    """List issued certificates (renewed and revoked ones included)."""
    certs = _ca(ctx).list()
    _emit(as_json, [c.to_json() for c in certs], lambda c: c.print(_table(certs)))
