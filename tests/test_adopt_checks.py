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
    netns_refusal,
    with_godwit,
    without_godwit,
)
from godwit.bundle import oci_config
from godwit.errors import GodwitError

LO = {"ifname": "lo", "link_type": "loopback",
      "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}, {"local": "::1", "prefixlen": 128}]}


def test_foreign_defaults_to_runc_root_and_name() -> None:
    assert Foreign.from_json({}, "web") == Foreign(DEFAULT_RUNC_ROOT, "web")
    assert Foreign.from_json({"runc_root": "/r", "id": "x1"}, "web").state_dir == Path("/r/x1")
    with pytest.raises(GodwitError, match="not an absolute path"):
        Foreign.from_json({"runc_root": "rel"}, "web")
    with pytest.raises(GodwitError, match="invalid container name"):
        Foreign.from_json({"id": "../etc"}, "web")


def test_loopback_only_netns_is_adoptable() -> None:
    assert netns_refusal([LO]) is None


def test_netns_with_more_than_loopback_is_refused() -> None:
    veth = {"ifname": "eth0", "link_netnsid": 0, "linkinfo": {"info_kind": "veth"}}
    assert "eth0 (veth with its peer outside the container)" in netns_refusal([LO, veth])
    bridge = {"ifname": "br0", "linkinfo": {"info_kind": "bridge"}}
    assert "br0 (bridge)" in netns_refusal([LO, bridge])
    own = {**LO, "addr_info": [*LO["addr_info"], {"local": "10.9.0.1", "prefixlen": 32}]}
    assert "lo has address 10.9.0.1/32" in netns_refusal([own])


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


def test_state_gets_godwit_netns_and_criu_config_and_loses_them_on_release() -> None:
    netns, conf = Path("/run/netns/gwc-a-web"), Path("/s/containers/web/criu.conf")
    state = with_godwit(runc_state("/b/rootfs", ["bundle=/b", f"{CRIU_CONFIG_LABEL}=/x"]),
                        netns, conf)
    assert state["config"]["namespaces"][1] == {"type": "NEWNET", "path": str(netns)}
    assert state["config"]["labels"] == ["bundle=/b", f"{CRIU_CONFIG_LABEL}={conf}"]
    back = without_godwit(state, netns, (Path("/s/containers/web"), Path("/s/released/w")))
    assert back == runc_state("/b/rootfs", ["bundle=/b"])


def test_release_moves_a_godwit_owned_bundle_and_rootfs() -> None:
    old, new = Path("/s/containers/web"), Path("/s/released/web-1")
    state = runc_state(f"{old}/rootfs", [f"bundle={old}/bundle"])
    back = without_godwit(state, Path("/run/netns/gwc-b-web"), (old, new))
    assert back["config"]["rootfs"] == f"{new}/rootfs"
    assert back["config"]["labels"] == [f"bundle={new}/bundle"]
