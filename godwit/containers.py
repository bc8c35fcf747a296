"""The containers of one host: godwit's records beside runc's own state."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from godwit import freezer
from godwit.bundle import load_config, rewrite_for_host
from godwit.cgroups import CGROUP_PARENT, CGROUP_ROOT
from godwit.criu import criu_base_options
from godwit.departures import DEPARTED, Departures
from godwit.errors import Conflict, GodwitError, NotFound
from godwit.fsio import atomic_write, replace_file
from godwit.network import (
    ContainerNet,
    can_change_netns,
    config_with_netns,
    create_container_netns,
    create_private_netns,
    delete_container_netns,
    netns_name,
    netns_path,
    reset_connections,
    send_gratuitous_arp,
    set_link,
)
from godwit.runc import ContainerState, Runc

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    """Container names become paths and cgroup names: keep them tame."""
    if not NAME_PATTERN.match(name or ""):
        raise GodwitError(f"invalid container name {name!r} (letters, digits, _ . -; max 64)")
    return name


@dataclass
class ContainerRecord:
    """What godwit remembers about a container on this host."""

    name: str
    rootfs: str
    rootfs_owned: bool
    created_at: float
    origin: str | None = None
    net: dict | None = None  # ContainerNet.to_json() of a container on the host bridge
    # godwit made its netns (loopback only, external to CRIU): containers without an
    # address before their netns was carried by CRIU (see start()), and adopted ones
    private_netns: bool = False
    image: str | None = None  # provenance of a container run from an image (godwit.images)
    image_digest: str | None = None
    exposed_ports: list[str] | None = None
    # a runc container godwit adopted here (godwit.adopt): its runc root and id before,
    # and the cgroup runc gave it (godwit's own path is the destination's)
    adopted: dict | None = None

    @property
    def owns_netns(self) -> bool:
        """Its netns is godwit's, on every host it runs on: made, moved, deleted by godwit."""
        return bool(self.net) or self.private_netns

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HostNetworking:
    """Where this host's containers get their netns: a per-kernel-unique id and a bridge."""

    netns_id: str
    bridge: str = "br0"

    def netns(self, name: str) -> str:
        return netns_name(self.netns_id, name)

    def create(self, name: str, net: ContainerNet, *, connected: bool = True) -> Path:
        try:
            return create_container_netns(self.netns_id, name, net, bridge=self.bridge,
                                          connected=connected)
        except (OSError, FileExistsError, NetlinkError) as exc:
            raise GodwitError(f"cannot give {name} the address {net.ip} here: {exc}") from exc

    def create_private(self, name: str) -> Path:
        try:
            return create_private_netns(self.netns_id, name)
        except (OSError, FileExistsError, NetlinkError) as exc:
            raise GodwitError(f"cannot make a netns for {name} here: {exc}") from exc

    def delete(self, name: str) -> None:
        delete_container_netns(self.netns_id, name)

    def isolate(self, name: str) -> None:
        try:
            set_link(name, False)
        except (OSError, NetlinkError, RuntimeError) as exc:
            raise GodwitError(f"cannot isolate {name}: {exc}") from exc

    def reset_connections(self, name: str, net: ContainerNet) -> None:
        """Abort its TCP connections with other hosts (see network.reset_connections)."""
        try:
            reset_connections(self.netns_id, name, net.address)
        except (OSError, RuntimeError) as exc:
            raise GodwitError(f"cannot reset the connections of {name}: {exc}") from exc

    def connect(self, name: str) -> None:
        """Bring the container's link up and tell the L2 segment where its MAC is now."""
        try:
            set_link(name, True)
            send_gratuitous_arp(self.netns(name))
        except (OSError, NetlinkError, RuntimeError) as exc:
            raise GodwitError(f"cannot connect {name}: {exc}") from exc


class ContainerStore:
    """Records under `<state>/containers/<name>/` plus the runc root of this host."""

    def __init__(self, state_dir: Path, runc: Runc, host: str,
                 networking: HostNetworking | None = None) -> None:
        self.root = state_dir / "containers"
        self.root.mkdir(parents=True, exist_ok=True)
        self.runc = runc
        self.host = host
        self.networking = networking or HostNetworking(host)
        self.departures = Departures(self)

    def dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def bundle_dir(self, name: str) -> Path:
        return self.dir(name) / "bundle"

    def criu_config(self, name: str) -> Path:
        """Per-container CRIU options, read by runc via the org.criu.config annotation."""
        return self.dir(name) / "criu.conf"

    def write_criu_config(self, name: str, extra: list[str] | tuple[str, ...] = ()) -> None:
        """CRIU options runc cannot pass: godwit's own, plus `extra` for one migration."""
        lines = [*criu_base_options(), *extra]
        replace_file(self.criu_config(name), "\n".join(lines) + "\n", 0o644)

    def cgroups_path(self, name: str) -> str:
        """Per-host cgroup path, so that hosts sharing a kernel never collide: under the
        host's netns id (per-kernel unique; the host name unless the agent was given
        `--netns-id`, as testbeds do, whose hosts are all called a, b, ...). An adopted
        container keeps the cgroup runc gave it."""
        record = self.dir(name) / "record.json"
        adopted = json.loads(record.read_text()).get("adopted") if record.exists() else None
        if adopted:
            return adopted["cgroup"]
        return f"/{CGROUP_PARENT}/{self.networking.netns_id}/{name}"

    def record(self, name: str) -> ContainerRecord:
        path = self.dir(name) / "record.json"
        if not path.exists():
            raise NotFound(f"container {name} not found on {self.host}")
        return self.record_from(json.loads(path.read_text()))

    @staticmethod
    def record_from(fields: dict) -> ContainerRecord:
        return ContainerRecord(**fields)

    def save(self, record: ContainerRecord) -> None:
        path = self.dir(record.name) / "record.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record.to_json(), indent=1))

    def freeze(self, name: str) -> None:
        """Freeze the container's cgroup, as `runc pause` does (see godwit.freezer)."""
        freezer.freeze(CGROUP_ROOT, self.cgroups_path(name))

    def memory_usage(self, name: str) -> int:
        """Bytes of memory the container's cgroup uses now (0 when unknown)."""
        path = self.cgroups_path(name).lstrip("/")
        for candidate in (CGROUP_ROOT / "memory" / path / "memory.usage_in_bytes",
                          CGROUP_ROOT / path / "memory.current"):
            if candidate.exists():
                return int(candidate.read_text())
        return 0

    def pids(self, name: str) -> set[int]:
        """Host pids of every process of the container (its cgroup's procs)."""
        path = self.cgroups_path(name).lstrip("/")
        for procs in (CGROUP_ROOT / "freezer" / path / "cgroup.procs",
                      CGROUP_ROOT / path / "cgroup.procs",
                      CGROUP_ROOT / "unified" / path / "cgroup.procs"):
            if procs.exists():
                return {int(pid) for pid in procs.read_text().split()}
        return set()

    def private_memory(self, name: str) -> int:
        """Bytes of private anonymous memory: what a post-copy dump leaves out of the freeze
        (CRIU serves only such pages lazily; shared memory and the page cache, which the
        cgroup's usage also counts, are not). 0 when unknown."""
        path = self.cgroups_path(name).lstrip("/")
        for stat, key in ((CGROUP_ROOT / "memory" / path / "memory.stat", "total_rss"),
                          (CGROUP_ROOT / path / "memory.stat", "anon")):
            if stat.exists():
                values = dict(line.split() for line in stat.read_text().splitlines())
                return int(values.get(key, 0))
        return 0

    def exists(self, name: str) -> bool:
        """A container of this name is here, or is being deleted (`godwit.departures`)."""
        directory = self.dir(name)
        return (directory / "record.json").exists() or (directory / DEPARTED).exists()

    def install_bundle(self, name: str, config: dict, rootfs: Path, own_netns: bool) -> Path:
        """Write this host's config.json for a container: own cgroup path, absolute rootfs,
        and for a container with a godwit netns this host's netns (never the source's)."""
        bundle = self.bundle_dir(name)
        bundle.mkdir(parents=True, exist_ok=True)
        host_config = rewrite_for_host(config, rootfs=rootfs, cgroups_path=self.cgroups_path(name))
        if own_netns:
            host_config = config_with_netns(host_config,
                                            netns_path(self.networking.netns_id, name))
        annotations = host_config.setdefault("annotations", {})
        annotations["org.criu.config"] = str(self.criu_config(name))
        self.write_criu_config(name)
        atomic_write(bundle / "config.json", json.dumps(host_config, indent=1))  # env: 0600
        return bundle

    def config(self, name: str) -> dict:
        return load_config(self.bundle_dir(name))

    async def create(self, name: str, bundle: Path,
                     net: ContainerNet | None = None) -> ContainerRecord:
        """Start a container from an operator's bundle directory (used in place)."""
        check_name(name)
        config, rootfs = _read_bundle(bundle)
        return await self.start(ContainerRecord(name, str(rootfs), False, time.time()),
                                config, net)

    async def check_new(self, name: str) -> None:
        """Refuse a name this host already has a container (or a runc container) of."""
        check_name(name)
        await self.departures.settled(name)
        if self.exists(name) or await self._runc_knows(name):
            raise Conflict(f"container {name} already exists on {self.host}")

    async def start(self, record: ContainerRecord, config: dict, net: ContainerNet | None,
                    *, rootfs_from: Path | None = None) -> ContainerRecord:
        """The one way a container is created here: record, owned rootfs (moved from
        `rootfs_from` to record.rootfs), netns, this host's bundle, `runc run`; a failure
        undoes all of it. A container without an address that may reconfigure its netns
        keeps the one runc makes, which CRIU dumps and restores (godwit.criu_gate): what
        it configures there moves with it. Any other gets a loopback-only netns of
        godwit's, external to CRIU, which costs the freeze nothing."""
        name = record.name
        await self.check_new(name)
        if not net and not can_change_netns(config):
            record.private_netns = True
        if net:
            self.check_address_free(net)
        record.net = net.to_json() if net else None
        self.save(record)
        try:
            if rootfs_from:
                rootfs_from.rename(record.rootfs)
            if net:
                await asyncio.to_thread(self.networking.create, name, net)
            elif record.private_netns:
                await asyncio.to_thread(self.networking.create_private, name)
            bundle_dir = self.install_bundle(name, config, Path(record.rootfs),
                                             record.owns_netns)
            await self.runc.run_detached(name, bundle_dir)
        except (GodwitError, OSError):
            await self.discard(record)
            raise
        return record

    def check_address_free(self, net: ContainerNet) -> None:
        for path in self.root.glob("*/record.json"):
            other = json.loads(path.read_text()).get("net") or {}
            if other.get("ip", "").split("/")[0] == net.address:
                raise Conflict(f"address {net.address} is already used by "
                               f"{path.parent.name} on {self.host}")

    async def discard(self, record: ContainerRecord, *, keep_rootfs: bool = False) -> None:
        """Kill the container and drop everything of it on this host, netns included
        (see `forget` for the rootfs)."""
        await self.runc.delete(record.name)
        if record.owns_netns:
            await asyncio.to_thread(self.networking.delete, record.name)
        self.forget(record.name, keep_rootfs=keep_rootfs)

    async def _runc_knows(self, name: str) -> bool:
        try:
            await self.runc.state(name)
        except NotFound:
            return False
        return True

    async def state(self, name: str) -> ContainerState | None:
        try:
            return await self.runc.state(name)
        except NotFound:
            return None

    async def describe(self, name: str) -> dict:
        record = self.record(name)
        state = await self.state(name)
        return _describe(record, state, self.host, self.memory_usage(name))

    async def list(self) -> list[dict]:
        states = {s.name: s for s in await self.runc.list()}
        return [_describe(self.record(n), states.get(n), self.host, self.memory_usage(n))
                for n in self.names()]

    def names(self) -> list[str]:
        """The containers this host keeps a record of, sorted."""
        return sorted(p.parent.name for p in self.root.glob("*/record.json"))

    async def remove(self, name: str) -> None:
        """Kill and delete a container and everything godwit kept for it."""
        await self.discard(self.record(name))

    def forget(self, name: str, *, keep_rootfs: bool = False) -> None:
        """Drop the record, this host's bundle and an owned rootfs (never an operator's)."""
        directory = self.dir(name)
        if not keep_rootfs:
            shutil.rmtree(directory, ignore_errors=True)
            return
        for entry in directory.glob("*"):
            if entry.name != "rootfs":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _read_bundle(bundle: Path) -> tuple[dict, Path]:
    """Validate an operator's bundle; return its config and absolute rootfs path."""
    if not bundle.is_dir():
        raise GodwitError(f"bundle {bundle} is not a directory")
    try:
        config = load_config(bundle)
    except FileNotFoundError as exc:
        raise GodwitError(f"bundle {bundle} has no config.json") from exc
    except ValueError as exc:
        raise GodwitError(f"bundle {bundle}: config.json is not valid JSON") from exc
    root = config.get("root", {}).get("path")
    if not root:
        raise GodwitError(f"bundle {bundle}: config.json has no root.path")
    rootfs = (bundle / root).resolve()
    if not rootfs.is_dir():
        raise GodwitError(f"bundle {bundle}: rootfs {rootfs} is not a directory")
    return config, rootfs


def _describe(record: ContainerRecord, state: ContainerState | None, host: str,
              memory: int) -> dict:
    return {
        **record.to_json(),
        "host": host,
        "memory": memory,
        "status": state.status if state else "missing",
        "pid": state.pid if state else 0,
    }
