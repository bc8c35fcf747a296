"""What `godwit adopt` refuses, and how it edits runc's state (no runc needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from godwit.adopt import (
    CRIU_CONFIG_LABEL,
    DEFAULT_RUNC_ROOT,
    Foreign,
    check_config,
    check_netns_kind,
    check_stdio,
    with_godwit,
    without_godwit,
)
from godwit.bundle import oci_config
from godwit.errors import GodwitError
from godwit.netns_carry import outside_links
from godwit.protocol import AdoptRequest

LO = {"ifname": "lo", "link_type": "loopback"}


def test_foreign_defaults_to_runc_root_and_name() -> None:
    assert Foreign.of(AdoptRequest(), "web") == Foreign(DEFAULT_RUNC_ROOT, "web")
    where = Foreign.of(AdoptRequest(runc_root="/r", id="x1"), "web")
    assert where.state_dir == Path("/r/x1")
    with pytest.raises(GodwitError, match="not an absolute path"):
        Foreign.of(AdoptRequest(runc_root="rel"), "web")
    with pytest.raises(GodwitError, match="invalid container name"):
        Foreign.of(AdoptRequest(id="../etc"), "web")


def test_netns_with_devices_inside_is_carried() -> None:
    bridge = {"ifname": "br0", "link_type": "ether", "linkinfo": {"info_kind": "bridge"}}
    inner_pair = [{"ifname": "v0", "linkinfo": {"info_kind": "veth"}},
                  {"ifname": "v1", "linkinfo": {"info_kind": "veth"}}]
    assert outside_links([LO, bridge, *inner_pair]) is None


def test_device_linked_outside_is_refused() -> None:
    veth = {"ifname": "eth0", "link_netnsid": 0, "linkinfo": {"info_kind": "veth"}}
    assert "interface eth0 (veth) linked to a namespace outside" in outside_links([LO, veth])
    macvlan = {"ifname": "mv0", "link_netnsid": 1, "link_type": "ether",
               "linkinfo": {"info_kind": "macvlan"}}
    assert "mv0 (macvlan)" in outside_links([LO, macvlan])


def test_veth_to_a_netns_nested_in_the_container_is_carried() -> None:
    veth = {"ifname": "zdtm0", "link_netnsid": 2, "linkinfo": {"info_kind": "veth"}}
    assert outside_links([LO, veth], inside=frozenset({2})) is None
    assert "zdtm0 (veth)" in outside_links([LO, veth], inside=frozenset({0, 1}))


def test_host_or_joined_netns_is_refused() -> None:
    check_netns_kind([{"type": "NEWPID", "path": ""}, {"type": "NEWNET", "path": ""}])
    with pytest.raises(GodwitError, match="shares the host's network namespace"):
        check_netns_kind([{"type": "NEWPID", "path": ""}])
    with pytest.raises(GodwitError, match="joined the network namespace /run/netns/x"):
        check_netns_kind([{"type": "NEWNET", "path": "/run/netns/x"}])


def test_stdio_must_be_dev_null_or_a_pipe() -> None:
    check_stdio(["/dev/null", "pipe:[123]", "pipe:[124]"])
    with pytest.raises(GodwitError, match=r"its stdout is /var/log/x\.log"):
        check_stdio(["/dev/null", "/var/log/x.log", "/dev/null"])
    with pytest.raises(GodwitError, match="its stdin is /dev/pts/3"):
        check_stdio(["/dev/pts/3", "/dev/null", "/dev/null"])


def test_terminal_and_missing_rootfs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "rootfs").mkdir()
    config = oci_config(["/bin/sh"])
    assert check_config(config, tmp_path) == tmp_path / "rootfs"
    config["process"]["terminal"] = True
    with pytest.raises(GodwitError, match="has a terminal"):
        check_config(config, tmp_path)
    config["process"]["terminal"] = False
    config["root"]["path"] = "missing"
    with pytest.raises(GodwitError, match="is not a directory"):
        check_config(config, tmp_path)


def runc_state(rootfs: str, labels: list[str]) -> dict:
    return {"config": {"rootfs": rootfs, "labels": labels, "namespaces": [
        {"type": "NEWPID", "path": ""}, {"type": "NEWNET", "path": ""}]}}


def test_state_gets_godwit_criu_config_and_loses_it_on_release() -> None:
    netns, conf = Path("/run/netns/gwc-a-web"), Path("/s/containers/web/criu.conf")
    state = with_godwit(runc_state("/b/rootfs", ["bundle=/b", f"{CRIU_CONFIG_LABEL}=/x"]),
                        conf)
    assert state["config"]["namespaces"][1] == {"type": "NEWNET", "path": ""}
    assert state["config"]["labels"] == ["bundle=/b", f"{CRIU_CONFIG_LABEL}={conf}"]
    back = without_godwit(state, netns, (Path("/s/containers/web"), Path("/s/released/w")))
    assert back == runc_state("/b/rootfs", ["bundle=/b"])
    state["config"]["namespaces"][1]["path"] = str(netns)  # a netns godwit made
    assert without_godwit(state, netns, (Path("/x"), Path("/y"))) == back


def test_release_moves_a_godwit_owned_bundle_and_rootfs() -> None:
    old, new = Path("/s/containers/web"), Path("/s/released/web-1")
    state = runc_state(f"{old}/rootfs", [f"bundle={old}/bundle"])
    back = without_godwit(state, Path("/run/netns/gwc-b-web"), (old, new))
    assert back["config"]["rootfs"] == f"{new}/rootfs"
    assert back["config"]["labels"] == [f"bundle={new}/bundle"]
