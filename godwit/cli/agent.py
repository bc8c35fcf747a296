"""`godwit agent`: run the agent of this host."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

import click

from godwit import criu
from godwit.agent import Agent, QosSetting, default_name, serve
from godwit.api import normalize_address
from godwit.cluster.node import ClusterNode
from godwit.containers import HostNetworking
from godwit.errors import GodwitError
from godwit.qos import QosPolicy
from godwit.runc import DEFAULT_RUNC
from godwit.tls import TLSFiles, server_context

file_option = click.Path(dir_okay=False, exists=True)


@click.command("agent")
@click.option("--listen", default="0.0.0.0:7451", show_default=True, help="ADDR:PORT to serve.")
@click.option("--state-dir", default="/var/lib/godwit", show_default=True,
              type=click.Path(file_okay=False), help="Records, staging and reports.")
@click.option("--runc-root", default="/run/godwit/runc", show_default=True,
              type=click.Path(file_okay=False), help="runc --root for this host's containers.")
@click.option("--runc", "runc", default=DEFAULT_RUNC, show_default=True, envvar="GODWIT_RUNC",
              help="The runc binary for this host's containers [env GODWIT_RUNC].")
@click.option("--name", default=None, help="Host name reported to peers [default: hostname].")
@click.option("--tls-ca", type=file_option, help="godwit CA certificate (PEM).")
@click.option("--tls-cert", type=file_option, help="This agent's certificate (PEM).")
@click.option("--tls-key", type=file_option, help="This agent's private key (PEM).")
@click.option("--tls-crl", type=file_option, help="CRL from the CA; re-read when it changes.")
@click.option("--container-bridge", default="br0", show_default=True,
              help="Bridge (on the host's uplink) where networked containers are plugged.")
@click.option("--netns-id", default=None,
              help="Unique id in container netns names [default: the host name].")
@click.option("--qos-uplink", help="Shape outgoing migration traffic on this interface.")
@click.option("--qos-link-mbit", type=float, help="Link rate of the uplink (Mbit/s).")
@click.option("--qos-migration-mbit", type=float,
              help="Rate guaranteed to migration traffic (Mbit/s); the rest is guaranteed "
                   "to everything else.")
@click.option("--qos-migration-ceil-mbit", type=float,
              help="Most migration traffic may take when the link is idle [default: link].")
@click.option("--etcd", "etcd", default=None, metavar="URLS",
              help="Cluster mode: register this host in etcd (https://ADDR:PORT, comma-"
                   "separated members), with this agent's TLS files. Default: standalone.")
@click.option("--insecure", is_flag=True,
              help="Plain HTTP, no authentication: only for an isolated lab network.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--criu-log-level", default="info", show_default=True,
              type=click.Choice(sorted(criu.LOG_LEVELS)),
              help="Level of CRIU's dump and restore logs, kept for a failed migration: "
                   "debug adds ~15 ms to a post-copy freeze at 8 GiB.")
def agent(listen: str, state_dir: str, runc_root: str, runc: str, name: str | None,
          tls_ca: str | None, tls_cert: str | None, tls_key: str | None, tls_crl: str | None,
          container_bridge: str, netns_id: str | None, etcd: str | None, insecure: bool,
          log_level: str, criu_log_level: str, **qos_options: object) -> None:
    """Serve this host's containers and accept migrations from authenticated peers."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    criu.set_log_level(criu_log_level)
    files = _tls_files(tls_ca, tls_cert, tls_key, tls_crl, insecure)
    state = Path(state_dir)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)  # containers' configs, environments and rootfs: root only
    host = name or default_name()
    networking = HostNetworking(netns_id or host, container_bridge)
    host_agent = Agent(host, state, Path(runc_root), networking=networking, tls=files,
                       qos=_qos(**qos_options), runc=_runc_binary(runc),
                       cluster=_cluster(etcd, files, host, normalize_address(listen)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host_agent, normalize_address(listen),
                          server_context(files) if files else None))


def _cluster(etcd: str | None, files: TLSFiles | None, host: str,
             listen: str) -> ClusterNode | None:
    """Cluster mode's link to etcd; None in standalone mode."""
    if not etcd:
        return None
    if files is None:
        raise click.UsageError("--etcd needs the agent's TLS files (etcd requires them)")
    try:
        return ClusterNode(etcd, files, host, listen)
    except GodwitError as exc:
        raise click.UsageError(f"--etcd: {exc}") from exc


def _runc_binary(runc: str) -> str:
    """The runc to use, as a path or a name on PATH; a usage error if there is none."""
    found = shutil.which(runc)
    if not found:
        raise click.UsageError(f"--runc: no executable runc at {runc}")
    return found


def _qos(qos_uplink: str | None, qos_link_mbit: float | None,
         qos_migration_mbit: float | None, qos_migration_ceil_mbit: float | None
         ) -> QosSetting | None:
    if not qos_uplink:
        return None
    if not (qos_link_mbit and qos_migration_mbit):
        raise click.UsageError("--qos-uplink needs --qos-link-mbit and --qos-migration-mbit")
    try:
        policy = QosPolicy(qos_link_mbit, qos_migration_mbit,
                           qos_migration_ceil_mbit or qos_link_mbit)
    except ValueError as exc:
        raise click.UsageError(f"QoS: {exc}") from exc
    return QosSetting(qos_uplink, policy)


def _tls_files(ca: str | None, cert: str | None, key: str | None, crl: str | None,
               insecure: bool) -> TLSFiles | None:
    if insecure:
        if ca or cert or key:
            raise click.UsageError("--insecure cannot be combined with --tls-* options")
        logging.getLogger("godwit.agent").warning("running WITHOUT TLS: anyone can reach it")
        return None
    if not (ca and cert and key):
        raise click.UsageError("TLS is required: pass --tls-ca, --tls-cert and --tls-key "
                               "(see `godwit ca issue`), or --insecure for a lab network")
    return TLSFiles(Path(ca), Path(cert), Path(key), Path(crl) if crl else None)
