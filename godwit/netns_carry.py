"""What CRIU can carry of a container's own network namespace (one runc made for it).

CRIU dumps such a netns with everything inside (addresses, routes, rules, firewall, and
devices that live wholly inside: lo, a bridge, a veth pair with both ends inside; see
godwit.criu_gate for how runc is kept from leaving it out) and makes it again on the
destination. It carries the network namespaces nested inside the container (a task that
unshared its own) too, and the veths between them. A device linked to a namespace outside
the container (a veth whose peer is on the host, a macvlan on a host device) cannot be:
its other end stays behind. Such a container is refused before it is frozen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable

from godwit import procfs
from godwit.preflight import Finding

# Run inside one of the container's netns: the netns ids (as that netns numbers them) of
# the netns of the given pids. A netns it has no id for prints -1, which no link carries.
_NSID_PROBE = """
import json, sys
from pyroute2 import IPRoute
with IPRoute() as ipr:
    ids = [ipr.get_netnsid(pid=int(pid))["nsid"] for pid in sys.argv[1:]]
print(json.dumps([-1 if nsid >= 2**31 else nsid for nsid in ids]))
"""


def outside_links(links: list[dict], inside: frozenset[int] = frozenset()) -> str | None:
    """Why a netns (`ip -j -d link show` inside it) cannot be carried, or None.

    `inside`: the ids this netns gives the container's other netns; a link to one of them
    stays inside the container."""
    for link in links:
        if "link_netnsid" in link and link["link_netnsid"] not in inside:
            name = link.get("ifname", "?")
            kind = link.get("linkinfo", {}).get("info_kind") or link.get("link_type", "?")
            return (f"its network namespace has interface {name} ({kind}) linked to a "
                    "namespace outside the container (e.g. a veth whose peer is on the "
                    "host): CRIU cannot carry it")
    return None


def netns_representatives(pids: Iterable[int]) -> dict[int, int]:
    """One pid per distinct network namespace among `pids` (keyed by the netns inode)."""
    found: dict[int, int] = {}
    for pid in sorted(pids):
        try:
            found.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, pid)
        except OSError:
            continue  # exited meanwhile
    return found


def _in_netns(pid: int, argv: list[str]) -> str:
    done = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise OSError(lines[-1] if lines else f"{argv[0]} exited {done.returncode}")
    return done.stdout


def refusal_in(pid: int, others: list[int]) -> str | None:
    """`outside_links` of the netns of `pid`, where `others` hold the container's other
    network namespaces."""
    links = json.loads(_in_netns(pid, ["ip", "-j", "-d", "link", "show"]) or "[]")
    inside: frozenset[int] = frozenset()
    if others and any("link_netnsid" in link for link in links):
        ids = _in_netns(pid, [sys.executable, "-c", _NSID_PROBE, *map(str, others)])
        inside = frozenset(json.loads(ids)) - {-1}
    return outside_links(links, inside)


def outside_link_refusal(pids: Iterable[int]) -> str | None:
    """Why the network namespaces of a container's processes `pids` cannot be carried,
    or None; unreadable is a refusal too."""
    holders = list(netns_representatives(pids).values())
    for pid in holders:
        try:
            reason = refusal_in(pid, [other for other in holders if other != pid])
        except (OSError, ValueError) as error:
            if not procfs.alive(pid):
                continue  # a short-lived task's netns went with it
            return f"cannot read its network namespace: {error}"
        if reason:
            return reason
    return None


def check_own_netns(pids: Iterable[int]) -> Finding:
    """Pre-flight of a container whose netns CRIU carries (`pids`: its processes)."""
    reason = outside_link_refusal(pids)
    if reason:
        return Finding("network namespace", "error", reason)
    return Finding("network namespace", "ok", "carried by CRIU")
