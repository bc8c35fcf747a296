"""What CRIU can carry of a container's own network namespace (one runc made for it).

CRIU dumps such a netns with everything inside (addresses, routes, rules, firewall, and
devices that live wholly inside: lo, a bridge, a veth pair with both ends inside; see
godwit.criu_gate for how runc is kept from leaving it out) and makes it again on the
destination. A device linked to another namespace (a veth whose peer is on the host, a
macvlan on a host device) cannot be: its other end stays behind. Such a container is
refused before it is frozen.
"""

from __future__ import annotations

import json
import subprocess

from godwit.preflight import Finding


def outside_links(links: list[dict]) -> str | None:
    """Why a netns (`ip -j -d link show` inside it) cannot be carried, or None."""
    for link in links:
        if "link_netnsid" in link:
            name = link.get("ifname", "?")
            kind = link.get("linkinfo", {}).get("info_kind") or link.get("link_type", "?")
            return (f"its network namespace has interface {name} ({kind}) linked to another "
                    "namespace (e.g. a veth whose peer is on the host): CRIU cannot carry it")
    return None


def outside_link_refusal(pid: int) -> str | None:
    """`outside_links` of the netns of process `pid`; unreadable is a refusal too."""
    argv = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "-d", "link", "show"]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return f"cannot read its network namespace: {done.stderr.strip()}"
    return outside_links(json.loads(done.stdout or "[]"))


def check_own_netns(pid: int | None) -> Finding:
    """Pre-flight of a container whose netns CRIU carries (`pid`: one of its processes)."""
    reason = outside_link_refusal(pid) if pid else None
    if reason:
        return Finding("network namespace", "error", reason)
    return Finding("network namespace", "ok", "carried by CRIU")
