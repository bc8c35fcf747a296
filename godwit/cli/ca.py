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

from godwit.fsio import atomic_write
from godwit.pki import (
    CRL_DAYS,
    ROLES,
    SERVERS,
    CertificateAuthority,
    IssuedCert,
    PKIError,
    Role,
    make_csr,
)

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
    for name in ("name", "role", "status", "not after", "days left", "serial", "SANs"):
        table.add_column(name, no_wrap=name != "SANs", overflow="fold")
    for c in certs:
        sans, days = ", ".join(c.sans) or "-", c.days_left()
        status = c.status() if days >= 0 or c.revoked else "expired"
        row = (c.name, c.role, status, f"{c.not_after:%Y-%m-%d}", str(days), c.serial, sans)
        table.add_row(*row, style=None if status == "valid" else "red")
    return table


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
days_option = click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)
sans_option = click.option("--san", "sans", multiple=True,
                           help="DNS name or IP address of the host (repeatable).")
role_option = click.option("--role", type=click.Choice(ROLES), default="agent",
                           show_default=True,
                           help="agent (a host), operator (drives it) or viewer (reads).")
target_argument = click.argument("serial_or_name", metavar="SERIAL|NAME")


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
@click.argument("name")
@role_option
@sans_option
@days_option
@json_option
@click.pass_context
@_handle_errors
def issue(ctx: click.Context, name: str, role: Role, sans: tuple[str, ...], days: int,
          as_json: bool) -> None:
    """Issue a key and certificate for NAME (an agent's SANs default to NAME itself).
    Prefer `csr` on the host and `sign` here: the key then never leaves the host."""
    authority = _ca(ctx)
    default = [name] if role in SERVERS else []
    _print_issued(as_json, authority, authority.issue(name, role, list(sans) or default, days))


@ca.command()
@click.argument("name")
@sans_option
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Where to write the new private key (0600, on this host).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CSR (default: stdout).")
@_handle_errors
def csr(name: str, sans: tuple[str, ...], key_path: Path, out: Path | None) -> None:
    """On the host: make a key and a certificate signing request for NAME; give the CSR to
    the CA (`godwit ca sign`). An agent's SANs default to NAME itself."""
    pem = make_csr(name, list(sans) or [name], key_path)
    if out:
        atomic_write(out, pem, 0o644)
        click.echo(f"key {key_path}\ncsr {out}: sign it with `godwit ca sign {out} --role …`")
    else:
        click.echo(pem.decode(), nl=False)


@ca.command()
@click.argument("csr_file", type=click.File("rb"))
@role_option
@days_option
@click.option("--renew", "renewal", is_flag=True,
              help="NAME already has a certificate: issue a new one beside it.")
@json_option
@click.pass_context
@_handle_errors
def sign(ctx: click.Context, csr_file: Any, role: Role, days: int, renewal: bool,
         as_json: bool) -> None:
    """Sign a CSR made by `godwit ca csr`: name and SANs from the CSR, role from --role."""
    authority = _ca(ctx)
    _print_issued(as_json, authority, authority.sign(csr_file.read(), role, days, renewal))


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


def _status_command(change: str, summary: str) -> None:
    """`godwit ca revoke|suspend|release SERIAL|NAME`: change, show what changed and where
    the new CRL is."""

    @ca.command(change, help=summary)
    @target_argument
    @json_option
    @click.pass_context
    @_handle_errors
    def command(ctx: click.Context, serial_or_name: str, as_json: bool) -> None:
        authority = _ca(ctx)
        certs = getattr(authority, change)(serial_or_name)
        data = {change.rstrip("e") + "ed": [c.to_json() for c in certs],
                "crl": str(authority.crl)}

        def human(console: Console) -> None:
            console.print(_table(certs))
            console.print(f"copy {authority.crl} to every agent (picked up without restart)")

        _emit(as_json, data, human)


_status_command("revoke", "Revoke every unrevoked certificate of NAME (old and renewed), "
                          "or one by serial; rewrites the CRL.")
_status_command("suspend", "Suspend certificates (revoked with certificateHold) until "
                           "`release`.")
_status_command("release", "Lift a suspension: the certificates are valid again.")


@ca.command()
@click.option("--days", type=click.IntRange(min=1), default=CRL_DAYS, show_default=True)
@click.option("--push", is_flag=True,
              help="Then install it on every configured host (with your operator certificate).")
@json_option
@click.pass_context
@_handle_errors
def crl(ctx: click.Context, days: int, push: bool, as_json: bool) -> None:
    """Re-sign the CRL with a new next-update date (agents refuse peers once it expires)."""
    authority = _ca(ctx)
    next_update = authority.refresh_crl(days)
    data: dict[str, Any] = {"crl": str(authority.crl), "next_update": next_update.isoformat(),
                            "days_left": days}
    if push:
        data["pushed"] = _push_crl(ctx, authority.crl.read_bytes())

    def human(console: Console) -> None:
        console.print(f"{authority.crl} valid until {next_update:%Y-%m-%d}")
        for host, outcome in data.get("pushed", {}).items():
            console.print(f"{host}: {outcome}")

    _emit(as_json, data, human)
    if any(o != "installed" for o in data.get("pushed", {}).values()):
        sys.exit(1)


def _push_crl(ctx: click.Context, pem: bytes) -> dict[str, str]:
    """PUT the CRL to every host of the CLI config; per host "installed" or the error."""
    from godwit.cli.common import Context, gather_hosts, run
    from godwit.errors import GodwitError

    root = ctx.find_object(Context)
    if root is None:
        raise CAError("--push needs the godwit CLI's config (`godwit ca crl --push`)")
    try:
        found = run(gather_hosts(root, root.host_names(),
                                 lambda agent: agent.request("PUT", "/v1/crl", data=pem)))
    except GodwitError as exc:
        raise CAError(str(exc)) from None
    return {host: f"error: {r}" if isinstance(r, GodwitError) else "installed"
            for host, r in found.items()}


@ca.command("list")
@json_option
@click.pass_context
@_handle_errors
def list_(ctx: click.Context, as_json: bool) -> None:
    """List issued certificates (renewed and revoked ones included), with days left."""
    certs = _ca(ctx).list()
    data = [c.to_json() | {"days_left": c.days_left()} for c in certs]
    _emit(as_json, data, lambda c: c.print(_table(certs)))
