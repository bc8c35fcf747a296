"""Admission policy: what a host agrees to run, from an operator (`run`) or a peer (an
incoming migration), before anything is created here or frozen on the source.

The default refuses what would give a container (or whoever sends one) the host: OCI hooks
(run as root in the host's namespaces), bind mounts outside the bind roots, capabilities
beyond runc's default set, joining existing namespaces or sharing the host's (a missing
pid/network/mount/ipc/uts namespace), device access beyond the usual pseudo-devices,
non-namespaced sysctls, a seccomp listener, bundles, root filesystems and shared root
filesystems outside the storage roots, unbounded timeouts, and container addresses outside
the container subnets or equal to the gateway, a network/broadcast address, a host's address.

A host policy file (JSON, ``<state>/policy.json``, else ``/etc/godwit/policy.json``) widens
it explicitly; every key is optional::

    {"storage_roots": ["/srv/bundles"], "bind_roots": ["/srv/volumes"],
     "capabilities": ["CAP_CHOWN"], "devices": [{"type": "c", "major": 10, "minor": 229}],
     "host_namespaces": [], "allow_hooks": false, "sysctls": ["kernel.domainname"],
     "subnets": ["10.0.0.0/24"], "reserved_addresses": ["10.0.0.11"],
     "max_commit_timeout": 3600, "max_idle_timeout": 86400, "strip_setid": false}

Lists add to the defaults (capabilities to runc's set, storage roots to the state dir).
``strip_setid`` makes received trees lose their set-id bits and file capabilities; by default
they keep them, as the container's own files (under 0700 dirs, out of other local users'
reach; what they grant inside the container stays within its admitted capabilities).
``subnets`` defaults to the networks of the container bridge's addresses; the host's own
addresses and its default gateways are always reserved.

What a peer's CRIU images hold (credentials, capabilities, seccomp filters of the frozen
tasks) is not inspected: CRIU restores tasks into the namespaces and cgroup of the admitted
config, so their capabilities cannot exceed the config's bounding set only if the sender was
honest. Treat a peer's images as trusted as the agent certificate that sent them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from godwit.bundle import DEFAULT_CAPS
from godwit.containers import check_name
from godwit.errors import GodwitError

SYSTEM_POLICY = Path("/etc/godwit/policy.json")
REQUIRED_NAMESPACES = ("pid", "network", "mount", "ipc", "uts")
KERNEL_MOUNTS = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
SAFE_SYSCTL_PREFIXES = ("net.", "kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue.")
# runc's own default device rules: null zero full random urandom tty console ptmx, pts.
DEFAULT_DEVICES = {("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9),
                   ("c", 5, 0), ("c", 5, 1), ("c", 5, 2), ("c", 136, None)}
NUMBER_LIMITS = {"commit_timeout": "max_commit_timeout", "idle_timeout": "max_idle_timeout"}


class AdmissionError(GodwitError):
    """The policy refuses a container; the message is one line naming the field."""


@dataclass(frozen=True)
class Policy:
    """What this host admits (see the module docstring for the file format)."""

    storage_roots: tuple[Path, ...] = ()
    bind_roots: tuple[Path, ...] = ()
    capabilities: frozenset[str] = frozenset(DEFAULT_CAPS)
    devices: frozenset[tuple[str, int, int | None]] = frozenset(DEFAULT_DEVICES)
    host_namespaces: frozenset[str] = frozenset()
    allow_hooks: bool = False
    sysctls: frozenset[str] = frozenset()
    subnets: tuple[ipaddress.IPv4Network, ...] = ()
    reserved_addresses: frozenset[ipaddress.IPv4Address] = frozenset()
    max_commit_timeout: float = 3600.0
    max_idle_timeout: float = 86400.0
    strip_setid: bool = False
    source: str = "the default policy"


@dataclass(frozen=True)
class HostFacts:
    """What the host's network says: its own addresses, gateways, container subnets."""

    addresses: frozenset[ipaddress.IPv4Address] = frozenset()
    gateways: frozenset[ipaddress.IPv4Address] = frozenset()
    bridge_networks: tuple[ipaddress.IPv4Network, ...] = field(default=())
    bridge_present: bool = True  # without it no container gets an address here at all


def load_policy(state_dir: Path, system: Path = SYSTEM_POLICY) -> Policy:
    """The host policy: ``<state>/policy.json``, else ``system``, else the default; the
    state dir is always a storage root."""
    path = next((p for p in (state_dir / "policy.json", system) if p.exists()), None)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AdmissionError(f"cannot read the admission policy {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise AdmissionError(f"admission policy {path} must be a JSON object")
    try:
        return parse_policy(raw, state_dir, str(path) if path else "the default policy")
    except (TypeError, ValueError, KeyError) as exc:
        raise AdmissionError(f"invalid admission policy {path}: {exc}") from None


def parse_policy(raw: dict[str, Any], state_dir: Path, source: str) -> Policy:
    """A Policy from a policy file's JSON object, widening the defaults."""
    unknown = set(raw) - {f for f in Policy.__dataclass_fields__ if f != "source"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    default = Policy()
    devices = {(d["type"], int(d["major"]), None if d.get("minor") is None else int(d["minor"]))
               for d in raw.get("devices", [])}
    limits = {k: _positive(float(raw.get(k, getattr(default, k))), k)
              for k in NUMBER_LIMITS.values()}
    return Policy(
        storage_roots=(state_dir, *map(Path, _strings(raw, "storage_roots"))),
        bind_roots=tuple(map(Path, _strings(raw, "bind_roots"))),
        capabilities=default.capabilities | {_cap(c) for c in _strings(raw, "capabilities")},
        devices=default.devices | devices,
        host_namespaces=frozenset(_strings(raw, "host_namespaces")),
        allow_hooks=_flag(raw, "allow_hooks"),
        strip_setid=_flag(raw, "strip_setid"),
        sysctls=frozenset(_strings(raw, "sysctls")),
        subnets=tuple(ipaddress.IPv4Network(s) for s in _strings(raw, "subnets")),
        reserved_addresses=frozenset(ipaddress.IPv4Address(a)
                                     for a in _strings(raw, "reserved_addresses")),
        source=source, **limits)


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _strings(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")
    return value


def _positive(value: float, what: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number")
    return value


def _cap(name: str) -> str:
    name = name.upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


# -- checks -------------------------------------------------------------------------------

def check_config(config: object, policy: Policy, *, netns_replaced: bool = False) -> None:
    """Refuse an OCI config.json the policy does not allow. ``netns_replaced``: godwit
    puts the container in its own netns here, whatever network path the config names."""
    if not isinstance(config, dict):
        raise AdmissionError("config must be a JSON object")
    linux = _obj(config, "linux")
    _check_hooks(config, policy)
    _check_mounts(config.get("mounts") or [], policy)
    _check_capabilities(_obj(_obj(config, "process"), "capabilities"), policy)
    _check_namespaces(linux.get("namespaces") or [], policy, netns_replaced)
    _check_devices(linux, policy)
    _check_sysctls(_obj(linux, "sysctl"), policy)
    if _obj(linux, "seccomp").get("listenerPath"):
        _refuse("linux.seccomp.listenerPath: a seccomp agent on this host is not allowed",
                policy)


def check_path(path: str | Path, what: str, policy: Policy) -> Path:
    """``path`` resolved, refused unless under a storage root."""
    resolved = Path(path).resolve()
    if not _under(resolved, policy.storage_roots):
        roots = ", ".join(map(str, policy.storage_roots))
        _refuse(f"{what} {path} is outside the storage roots ({roots})", policy)
    return resolved


def check_numbers(request: dict[str, Any], policy: Policy) -> None:
    """commit_timeout and idle_timeout: numbers, positive, finite, within the policy."""
    for key, limit_name in NUMBER_LIMITS.items():
        value = request.get(key)
        if value is None and key == "idle_timeout":
            continue
        limit = getattr(policy, limit_name)
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value) or not 0 < value <= limit:
            _refuse(f"{key} {value!r} must be a number in (0, {limit:g}] s", policy)


def check_address(net: object, policy: Policy, facts: HostFacts) -> None:
    """A container address: inside a container subnet, not the network's or broadcast
    address, not a gateway's nor a host's."""
    if not net:
        return
    if not isinstance(net, dict) or not isinstance(net.get("ip"), str):
        _refuse("net.ip must be an address with a prefix, e.g. 10.0.0.5/24", policy)
    try:
        interface = ipaddress.IPv4Interface(net["ip"])
        gateway = ipaddress.IPv4Address(net["gateway"]) if net.get("gateway") else None
    except ValueError as exc:
        _refuse(f"net: {exc}", policy)
    ip = interface.ip
    subnets = policy.subnets or facts.bridge_networks
    if not subnets and not facts.bridge_present:
        return  # nothing can be attached here: the network setup says so in its words
    if not subnets:
        _refuse("no container subnet is configured here: add \"subnets\" to the policy file",
                policy)
    inside = [s for s in subnets if ip in s]
    if not inside:
        _refuse(f"net.ip {ip} is outside the container subnets "
                f"({', '.join(map(str, subnets))})", policy)
    if any(ip in (s.network_address, s.broadcast_address) for s in inside):
        _refuse(f"net.ip {ip} is a network or broadcast address", policy)
    if ip == gateway or ip in facts.gateways:
        _refuse(f"net.ip {ip} is the gateway's address", policy)
    if ip in facts.addresses or ip in policy.reserved_addresses:
        _refuse(f"net.ip {ip} is a host's address", policy)


def check_run(body: dict[str, Any], policy: Policy, facts: HostFacts) -> None:
    """`POST /v1/containers`: an operator's bundle (and its rootfs) inside the storage
    roots with an admissible config; the address of either kind of container."""
    check_address(body.get("net"), policy, facts)
    if body.get("image") is not None:
        return  # godwit writes an image's config itself, in its state dir
    bundle = check_path(str(body.get("bundle", "")), "bundle", policy)
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return  # no readable config: the store says so in its own words
    check_config(config, policy)
    root = _obj(config, "root").get("path")
    if isinstance(root, str) and root:
        check_path(bundle / root, "root.path", policy)


def check_incoming(request: dict[str, Any], policy: Policy, facts: HostFacts) -> None:
    """`POST /v1/incoming`: the peer's config, shared rootfs, timeouts and address."""
    owns_netns = bool(request.get("net")) or bool(request.get("private_netns"))
    check_config(request.get("config"), policy, netns_replaced=owns_netns)
    if request.get("shared_rootfs"):
        check_path(str(request["shared_rootfs"]), "shared_rootfs", policy)
    check_numbers(request, policy)
    check_address(request.get("net"), policy, facts)


def _check_hooks(config: dict[str, Any], policy: Policy) -> None:
    hooks = _obj(config, "hooks")
    for stage, entries in hooks.items():
        if entries and not policy.allow_hooks:
            _refuse(f"hooks.{stage}: OCI hooks run as root on this host and are not allowed",
                    policy)


def _check_mounts(mounts: object, policy: Policy) -> None:
    if not isinstance(mounts, list):
        _refuse("mounts must be a list", policy)
    for i, mount in enumerate(mounts):
        if not isinstance(mount, dict):
            _refuse(f"mounts[{i}] must be an object", policy)
        options = mount.get("options") or []
        kind = mount.get("type") or "bind"
        if kind == "bind" or {"bind", "rbind"} & set(options):
            source = str(mount.get("source", ""))
            if not source.startswith("/") or not _under(Path(source).resolve(),
                                                        policy.bind_roots):
                _refuse(f"mounts[{i}] ({mount.get('destination')}): bind mount of {source} "
                        "is outside the bind roots", policy)
        elif kind not in KERNEL_MOUNTS:
            _refuse(f"mounts[{i}] ({mount.get('destination')}): filesystem type {kind!r} "
                    "is not allowed", policy)


def _check_capabilities(capabilities: dict[str, Any], policy: Policy) -> None:
    for kind, names in capabilities.items():
        extra = sorted({_cap(str(n)) for n in names or []} - policy.capabilities)
        if extra:
            _refuse(f"process.capabilities.{kind}: {', '.join(extra)} not allowed", policy)


def _check_namespaces(namespaces: object, policy: Policy, netns_replaced: bool) -> None:
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        _refuse("linux.namespaces must be a list of objects", policy)
    for ns in namespaces:
        kind = ns.get("type")
        replaced = kind == "network" and netns_replaced
        if ns.get("path") and not replaced and kind not in policy.host_namespaces:
            _refuse(f"linux.namespaces: joining the {kind} namespace {ns['path']} "
                    "is not allowed", policy)
    present = {ns.get("type") for ns in namespaces}
    for kind in REQUIRED_NAMESPACES:
        if kind not in present and kind not in policy.host_namespaces:
            _refuse(f"linux.namespaces: no {kind} namespace (the host's would be shared)",
                    policy)


def _check_devices(linux: dict[str, Any], policy: Policy) -> None:
    for i, device in enumerate(linux.get("devices") or []):
        key = (device.get("type"), device.get("major"), device.get("minor"))
        if not _device_allowed(key, policy.devices):
            _refuse(f"linux.devices[{i}] ({device.get('path')}): device {_dev(key)} "
                    "is not allowed", policy)
    for i, rule in enumerate(_obj(linux, "resources").get("devices") or []):
        key = (rule.get("type", "a"), rule.get("major"), rule.get("minor"))
        if rule.get("allow") and not _device_allowed(key, policy.devices):
            _refuse(f"linux.resources.devices[{i}]: access to {_dev(key)} is not allowed",
                    policy)


def _device_allowed(key: tuple[Any, Any, Any], allowed: Iterable[tuple]) -> bool:
    """A device node or rule: a FIFO, or a char/block device the policy lists (a rule for
    every minor needs a listed wildcard; type ``a`` never passes)."""
    kind, major, minor = key
    kind = "c" if kind == "u" else kind
    if kind == "p":
        return True
    if kind not in ("c", "b") or isinstance(major, bool) or not isinstance(major, int):
        return False
    every_minor = minor is None or minor == -1
    return any(kind == k and major == ma and (mi is None if every_minor else mi in (None, minor))
               for k, ma, mi in allowed)


def _dev(key: tuple[Any, Any, Any]) -> str:
    kind, major, minor = key
    return f"{kind} {'*' if major in (None, -1) else major}:{'*' if minor in (None, -1) else minor}"


def _check_sysctls(sysctls: dict[str, Any], policy: Policy) -> None:
    for key in sysctls:
        if not key.startswith(SAFE_SYSCTL_PREFIXES) and key not in policy.sysctls:
            _refuse(f"linux.sysctl.{key}: not a namespaced sysctl this host allows", policy)


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key) or {}
    if not isinstance(value, dict):
        raise AdmissionError(f"{key} must be a JSON object")
    return value


def _under(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == (root := Path(r).resolve()) or root in path.parents for r in roots)


def _refuse(reason: str, policy: Policy) -> Any:
    raise AdmissionError(f"refused by {policy.source}: {reason}")


# -- this host ----------------------------------------------------------------------------

def host_facts(bridge: str) -> HostFacts:
    """This network namespace's IPv4 addresses, default gateways and the networks of the
    container bridge ``bridge``."""
    from pyroute2 import IPRoute

    addresses, gateways, networks = set(), set(), []
    with IPRoute() as ipr:
        bridge_index = next(iter(ipr.link_lookup(ifname=bridge)), None)
        for addr in ipr.get_addr(family=socket.AF_INET):
            ip = ipaddress.IPv4Address(addr.get_attr("IFA_ADDRESS"))
            addresses.add(ip)
            if addr["index"] == bridge_index:
                networks.append(ipaddress.IPv4Interface(f"{ip}/{addr['prefixlen']}").network)
        for route in ipr.get_default_routes(family=socket.AF_INET):
            if gateway := route.get_attr("RTA_GATEWAY"):
                gateways.add(ipaddress.IPv4Address(gateway))
    return HostFacts(frozenset(addresses), frozenset(gateways), tuple(networks),
                     bridge_index is not None)


class Admission:
    """One host's admission: its policy file (re-read per check) and its network."""

    def __init__(self, state_dir: Path, bridge: str) -> None:
        self.state_dir, self.bridge = state_dir, bridge

    async def check_run(self, body: object) -> None:
        plain = _plain(body)
        check_name(str(plain.get("name", "")))  # bad input first, in the store's words
        await asyncio.to_thread(lambda: check_run(plain, *self._now()))

    async def check_incoming(self, request: object) -> None:
        plain = _plain(request)
        await asyncio.to_thread(lambda: check_incoming(plain, *self._now()))

    def device_rule(self) -> Callable[[str, int, int], bool]:
        """Which device nodes a received tree may hold (``chr``/``blk``, major, minor):
        those the policy's ``devices`` list, as read now."""
        devices = load_policy(self.state_dir).devices
        return lambda kind, major, minor: _device_allowed((kind[0], major, minor), devices)

    def keeps_setid(self) -> bool:
        """Do received trees keep set-id bits and file capabilities (not ``strip_setid``)?"""
        return not load_policy(self.state_dir).strip_setid

    def _now(self) -> tuple[Policy, HostFacts]:
        return load_policy(self.state_dir), host_facts(self.bridge)


def _plain(message: object) -> dict[str, Any]:
    """A typed protocol message as the JSON object it came as (a dict passes through)."""
    plain = message if isinstance(message, dict) else msgspec.to_builtins(message)
    if not isinstance(plain, dict):
        raise AdmissionError("the request must be a JSON object")
    return plain
