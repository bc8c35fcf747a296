"""Containers started by plain `runc run -d` (not by godwit) are adopted, migrated with
their memory, and released to plain runc on the destination; the ones CRIU could not
move are refused with one line and keep running."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_json, copies, wait_for

from godwit.bundle import load_config, save_config
from godwit.lab.bundles import COUNTER_SCRIPT, counter_bundle, read_count
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration


def plain_root(bed: Testbed, host: str) -> Path:
    """A runc root godwit's agents do not use, as an operator's /run/runc."""
    return bed.host(host).state_dir / "plain-runc"


def runc(bed: Testbed, host: str, *args: str, stdout=subprocess.PIPE) -> tuple[int, str]:
    """runc under the host's plain root, run inside the host's netns (stdio /dev/null for
    `run -d`, whose container inherits it)."""
    proc = bed.net.run_in(host, ["runc", "--root", str(plain_root(bed, host)), *args],
                          stdin=subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.DEVNULL if stdout != subprocess.PIPE
                          else subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out or ""


def runc_state(bed: Testbed, host: str, runc_id: str) -> dict | None:
    code, out = runc(bed, host, "state", runc_id)
    return json.loads(out) if code == 0 else None


def start_plain(bed: Testbed, runc_id: str, bundle: Path, stdout=subprocess.DEVNULL) -> Path:
    """`runc run -d` on host a, as an operator does; returns the rootfs."""
    config = load_config(bundle)
    config["linux"]["cgroupsPath"] = f"/{bed.prefix}-plain/{runc_id}"
    save_config(bundle, config)
    code, out = runc(bed, "a", "run", "-d", "--bundle", str(bundle), runc_id, stdout=stdout)
    assert code == 0, out
    assert (runc_state(bed, "a", runc_id) or {}).get("status") == "running"
    return bundle / "rootfs"


@pytest.fixture
def plain(bed: Testbed) -> Iterator[list[tuple[str, str]]]:
    """(host, id) of plain runc containers to delete at the end, wherever they are."""
    started: list[tuple[str, str]] = []
    yield started
    for host, runc_id in started:
        runc(bed, host, "delete", "--force", runc_id)
        bed.godwit("rm", runc_id)
    for parent in Path("/sys/fs/cgroup").glob(f"*/{bed.prefix}-plain"):
        parent.rmdir()  # runc removes a container's cgroup, not the parent we named


@pytest.mark.parametrize("shared", [False, True], ids=["rootfs-transfer", "shared-storage"])
def test_adopted_container_migrates_and_is_released_on_the_destination(
        bed: Testbed, plain: list, shared: bool) -> None:
    name = "adoptee-shared" if shared else "adoptee"
    plain.extend([("a", name), ("b", name)])
    rootfs = start_plain(bed, name, own_address(counter_bundle(bed.bundle_dir(name))))
    wait_for(lambda: (read_count(rootfs) or 0) >= 10, what="counter to reach 10")

    adopted = bed.godwit("adopt", name, "--host", "a", "--runc-root", str(plain_root(bed, "a")))
    assert adopted.returncode == 0, adopted.stderr
    assert runc_state(bed, "a", name) is None, "runc's state moved to the agent's root"
    assert copies(bed, name) == [("a", "running")]

    extra = ["--shared-storage"] if shared else []
    result = bed.godwit("migrate", name, "--to", "b", "--json", *extra)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["result"] == "ok", report.get("error")
    assert copies(bed, name) == [("b", "running")]
    assert (report["rootfs_bytes"] == 0) == shared, report["rootfs_bytes"]
    at_freeze = read_count(rootfs) or 0
    on_b = Path(next(r["rootfs"] for r in cli_json(bed, "ps")["containers"]
                     if r["name"] == name))
    assert (on_b == rootfs) == shared
    # A restarted shell would count from 1 again; the migrated one goes on.
    wait_for(lambda: (read_count(on_b) or 0) > at_freeze + 5, what="counter going on on b")
    assert at_freeze >= 10

    released = bed.godwit("release", name, "--runc-root", str(plain_root(bed, "b")))
    assert released.returncode == 0, released.stderr
    assert copies(bed, name) == [], "godwit forgot it"
    state = runc_state(bed, "b", name)
    assert state and state["status"] == "running", state
    code, count = runc(bed, "b", "exec", name, "cat", "/count")
    assert code == 0 and int(count) > at_freeze, count
    code, addresses = runc(bed, "b", "exec", name, "ip", "-4", "-o", "addr", "show", "lo")
    assert "10.99.0.7/32" in addresses, "CRIU carried the netns runc made"
    code, out = runc(bed, "b", "kill", name, "KILL")
    assert code == 0, out
    wait_for(lambda: (runc_state(bed, "b", name) or {}).get("status") == "stopped",
             what="plain runc to manage it")


def test_adopted_then_released_in_place_is_runc_s_again(bed: Testbed, plain: list) -> None:
    """adopt and release on the same host: the container never stops, runc's state goes
    back where it was and runc drives it as before."""
    plain.append(("a", "inplace"))
    rootfs = start_plain(bed, "inplace", counter_bundle(bed.bundle_dir("inplace")))
    root = str(plain_root(bed, "a"))
    assert bed.godwit("adopt", "inplace", "--host", "a", "--runc-root", root).returncode == 0
    pid = (cli_json(bed, "ps")["containers"][0])["pid"]
    released = bed.godwit("release", "inplace", "--runc-root", root, "--json")
    assert released.returncode == 0, released.stderr
    state = runc_state(bed, "a", "inplace")
    assert state and state["status"] == "running" and state["pid"] == pid, state
    assert state["bundle"] == str(rootfs.parent), "the operator's bundle, as before"
    before = read_count(rootfs) or 0
    wait_for(lambda: (read_count(rootfs) or 0) > before + 3, what="counter going on")
    code, out = runc(bed, "a", "pause", "inplace")
    assert code == 0, out
    assert runc(bed, "a", "resume", "inplace")[0] == 0


def own_address(bundle: Path) -> Path:
    """The counter, after giving itself an address on lo (in the netns runc made)."""
    config = load_config(bundle)
    config["process"]["args"][-1] = f"ip addr add 10.99.0.7/32 dev lo; {COUNTER_SCRIPT}"
    for caps in config["process"]["capabilities"].values():
        caps.append("CAP_NET_ADMIN")
    save_config(bundle, config)
    return bundle


def host_netns(bundle: Path) -> Path:
    config = load_config(bundle)
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"]
                                     if ns["type"] != "network"]
    save_config(bundle, config)
    return bundle


def veth_to_host(bed: Testbed, runc_id: str) -> None:
    """Give the container a veth whose peer stays in host a's netns."""
    pid = (runc_state(bed, "a", runc_id) or {})["pid"]
    proc = bed.net.run_in("a", ["ip", "link", "add", f"{bed.prefix}v", "type", "veth",
                                "peer", "name", "eth1", "netns", str(pid)])
    assert proc.wait(timeout=30) == 0


def test_unadoptable_containers_are_refused_and_keep_running(
        bed: Testbed, plain: list) -> None:
    log = bed.work / "host-file.log"
    cases = {
        "hostnet": (host_netns, subprocess.DEVNULL, "shares the host's network namespace"),
        "hostfile": (lambda b: b, log.open("w"), f"its stdout is {log}"),
        "hostveth": (lambda b: b, subprocess.DEVNULL,
                     "has interface eth1 (veth) linked to a namespace outside"),
    }
    for name, (adapt, stdout, reason) in cases.items():
        plain.append(("a", name))
        start_plain(bed, name, adapt(counter_bundle(bed.bundle_dir(name))), stdout=stdout)
        if name == "hostveth":
            veth_to_host(bed, name)
        refused = bed.godwit("adopt", name, "--host", "a",
                             "--runc-root", str(plain_root(bed, "a")))
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.strip().count("\n") == 0, refused.stderr
        assert reason in refused.stderr, refused.stderr
        assert (runc_state(bed, "a", name) or {}).get("status") == "running", name
        assert copies(bed, name) == []
