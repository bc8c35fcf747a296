"""The admission policy refuses what would give a container (or its sender) the host."""

from __future__ import annotations

import ipaddress
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from godwit.admission import (
    Admission,
    AdmissionError,
    HostFacts,
    Policy,
    check_address,
    check_config,
    check_incoming,
    check_numbers,
    check_run,
    load_policy,
)
from godwit.bundle import load_config, oci_config
from godwit.lab.bundles import counter_bundle
from godwit.network import config_with_netns

STATE = Path("/var/lib/godwit-test-state")
POLICY = Policy(storage_roots=(STATE,))
FACTS = HostFacts(
    addresses=frozenset({ipaddress.IPv4Address("10.0.0.2")}),
    gateways=frozenset({ipaddress.IPv4Address("10.0.0.1")}),
    bridge_networks=(ipaddress.IPv4Network("10.0.0.0/24"),),
)


def config() -> dict:
    return oci_config(["/bin/sh"])


def refused(match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(AdmissionError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)


def test_the_default_bundle_passes_the_default_policy() -> None:
    check_config(config(), POLICY)


def test_a_godwit_netns_path_passes_when_godwit_replaces_it() -> None:
    installed = config_with_netns(config(), "/run/netns/a-web")
    check_config(installed, POLICY, netns_replaced=True)
    refused(r"joining the network namespace /run/netns/a-web", check_config, installed, POLICY)


@pytest.mark.parametrize("stage", ["prestart", "createRuntime", "poststart", "poststop"])
def test_hooks_are_refused(stage: str) -> None:
    bad = config() | {"hooks": {stage: [{"path": "/bin/sh", "args": ["sh", "-c", "id"]}]}}
    refused(rf"hooks\.{stage}", check_config, bad, POLICY)
    check_config(bad, Policy(allow_hooks=True))


@pytest.mark.parametrize("source", ["/", "/etc", "/var/lib/godwit-test-state/../../etc"])
def test_host_bind_mounts_are_refused(source: str) -> None:
    bad = config()
    bad["mounts"].append({"destination": "/host", "type": "bind", "source": source,
                          "options": ["rbind", "rw"]})
    refused(r"mounts\[6\] \(/host\): bind mount of", check_config, bad, POLICY)


def test_bind_mount_inside_a_bind_root_passes(tmp_path: Path) -> None:
    good = config()
    good["mounts"].append({"destination": "/data", "source": str(tmp_path / "v"),
                           "options": ["bind"]})
    check_config(good, Policy(bind_roots=(tmp_path,)))
    refused("bind mount", check_config, good, POLICY)


def test_a_block_device_filesystem_is_refused() -> None:
    bad = config()
    bad["mounts"].append({"destination": "/disk", "type": "ext4", "source": "/dev/sda1"})
    refused(r"filesystem type 'ext4'", check_config, bad, POLICY)


@pytest.mark.parametrize("cap", ["CAP_SYS_ADMIN", "CAP_SYS_MODULE", "sys_ptrace"])
def test_capabilities_beyond_the_set_are_refused(cap: str) -> None:
    bad = oci_config(["/bin/sh"], capabilities=["CAP_KILL", cap])
    refused(r"process\.capabilities\.\w+: CAP_", check_config, bad, POLICY)


def test_policy_widens_capabilities(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text(json.dumps({"capabilities": ["SYS_PTRACE"]}))
    policy = load_policy(tmp_path, system=tmp_path / "none")
    check_config(oci_config(["/bin/sh"], capabilities=["CAP_SYS_PTRACE"]), policy)
    assert str(tmp_path / "policy.json") in policy.source


@pytest.mark.parametrize("kind", ["pid", "network", "mount", "ipc", "uts"])
def test_a_missing_namespace_is_refused(kind: str) -> None:
    bad = config()
    bad["linux"]["namespaces"] = [n for n in bad["linux"]["namespaces"] if n["type"] != kind]
    refused(rf"no {kind} namespace", check_config, bad, POLICY)


@pytest.mark.parametrize("kind", ["pid", "mount", "ipc", "uts", "user", "cgroup"])
def test_joining_a_host_namespace_is_refused(kind: str) -> None:
    bad = config()
    bad["linux"]["namespaces"].append({"type": kind, "path": "/proc/1/ns/" + kind})
    refused(rf"joining the {kind} namespace", check_config, bad, POLICY)


def test_device_access_beyond_the_default_is_refused() -> None:
    bad = config()
    bad["linux"]["resources"]["devices"].append({"allow": True, "access": "rwm"})
    refused(r"linux\.resources\.devices\[1\]: access to a \*:\*", check_config, bad, POLICY)
    bad = config()
    bad["linux"]["devices"] = [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]
    refused(r"linux\.devices\[0\] \(/dev/sda\)", check_config, bad, POLICY)
    fuse = config()
    fuse["linux"]["resources"]["devices"].append(
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"})
    refused("c 10:229", check_config, fuse, POLICY)
    check_config(fuse, Policy(devices=frozenset({("c", 10, 229)})))


def test_standard_pseudo_devices_pass() -> None:
    good = config()
    good["linux"]["resources"]["devices"] += [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": True, "type": "c", "major": 136, "minor": -1, "access": "rwm"}]
    check_config(good, POLICY)


def test_host_sysctls_and_seccomp_agents_are_refused() -> None:
    check_config(config() | {"linux": config()["linux"] | {"sysctl": {"net.ipv4.ip_forward": "1"}}},
                 POLICY)
    bad = config()
    bad["linux"]["sysctl"] = {"kernel.core_pattern": "|/tmp/x"}
    refused(r"linux\.sysctl\.kernel\.core_pattern", check_config, bad, POLICY)
    bad = config()
    bad["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x"}
    refused("listenerPath", check_config, bad, POLICY)


@given(st.one_of(st.just(math.inf), st.just(-math.inf), st.just(math.nan),
                 st.floats(max_value=0), st.floats(min_value=3600.001), st.text(),
                 st.booleans(), st.none()))
def test_unbounded_commit_timeouts_are_refused(value: object) -> None:
    with pytest.raises(AdmissionError, match="commit_timeout"):
        check_numbers({"commit_timeout": value}, POLICY)


@given(st.floats(min_value=0.001, max_value=3600))
def test_bounded_commit_timeouts_pass(value: float) -> None:
    check_numbers({"commit_timeout": value, "idle_timeout": value}, POLICY)


@pytest.mark.parametrize(("ip", "why"), [
    ("10.0.0.1/24", "gateway"), ("10.0.0.2/24", "host's address"),
    ("10.0.0.0/24", "network or broadcast"), ("10.0.0.255/24", "network or broadcast"),
    ("192.168.1.5/24", "outside the container subnets"), ("10.0.0.9/24", "host's address"),
    ("bad", "net:")])
def test_container_addresses_are_checked(ip: str, why: str) -> None:
    policy = Policy(reserved_addresses=frozenset({ipaddress.IPv4Address("10.0.0.9")}))
    refused(why, check_address, {"ip": ip, "gateway": "10.0.0.1"}, policy, FACTS)


@given(st.integers(min_value=3, max_value=254).filter(lambda n: n != 9))
def test_ordinary_container_addresses_pass(n: int) -> None:
    check_address({"ip": f"10.0.0.{n}/24", "gateway": "10.0.0.1"}, POLICY, FACTS)


def test_the_own_gateway_field_is_refused_even_off_the_host_routes() -> None:
    refused("gateway", check_address, {"ip": "10.0.0.7/24", "gateway": "10.0.0.7"}, POLICY,
            HostFacts(bridge_networks=FACTS.bridge_networks))


def test_no_subnet_known_refuses_addresses() -> None:
    refused("no container subnet", check_address, {"ip": "10.0.0.7/24"}, POLICY, HostFacts())


def test_run_needs_a_bundle_inside_the_storage_roots(tmp_path: Path) -> None:
    bundle = counter_bundle(tmp_path / "bundles" / "c")
    refused(r"bundle .* is outside the storage roots", check_run,
            {"name": "c", "bundle": str(bundle)}, POLICY, FACTS)
    check_run({"name": "c", "bundle": str(bundle)}, Policy(storage_roots=(tmp_path,)), FACTS)
    config = load_config(bundle)
    config["root"]["path"] = "/"
    (bundle / "config.json").write_text(json.dumps(config))
    refused(r"root\.path / is outside", check_run, {"name": "c", "bundle": str(bundle)},
            Policy(storage_roots=(tmp_path,)), FACTS)


def test_incoming_checks_config_rootfs_numbers_and_address() -> None:
    request = {"id": "1", "name": "web", "config": config(), "commit_timeout": 30,
               "idle_timeout": 60, "net": {"ip": "10.0.0.7/24", "gateway": "10.0.0.1"}}
    check_incoming(request, POLICY, FACTS)
    refused("shared_rootfs / is outside", check_incoming, request | {"shared_rootfs": "/"},
            POLICY, FACTS)
    refused("commit_timeout inf", check_incoming, request | {"commit_timeout": math.inf},
            POLICY, FACTS)
    refused("idle_timeout", check_incoming, request | {"idle_timeout": 1e12}, POLICY, FACTS)
    refused("config must be", check_incoming, request | {"config": []}, POLICY, FACTS)


def test_received_trees_keep_set_id_bits_unless_the_policy_strips_them(tmp_path: Path) -> None:
    admission = Admission(tmp_path, "no-such-bridge")
    assert admission.keeps_setid()
    (tmp_path / "policy.json").write_text(json.dumps({"strip_setid": True}))
    assert not admission.keeps_setid()
    (tmp_path / "policy.json").write_text(json.dumps({"strip_setid": "yes"}))
    refused("strip_setid must be true or false", load_policy, tmp_path, tmp_path / "none")


def test_a_broken_policy_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text('{"capabilitys": []}')
    refused("unknown key 'capabilitys'", load_policy, tmp_path, tmp_path / "none")
    (tmp_path / "policy.json").write_text('{"max_commit_timeout": Infinity}')
    refused("positive finite", load_policy, tmp_path, tmp_path / "none")
    (tmp_path / "policy.json").write_text("[")
    refused("cannot read the admission policy", load_policy, tmp_path, tmp_path / "none")


def test_without_the_bridge_no_address_is_checked_here() -> None:
    """Nothing can be attached: the network setup refuses in its own words."""
    check_address({"ip": "192.168.1.5/24"}, POLICY, HostFacts(bridge_present=False))
