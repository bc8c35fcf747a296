"""A migration that CRIU refuses: the report names CRIU's cause, the container goes on
running on the source, and `godwit report ID --logs` shows the logs both hosts kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_json, copies, wait_for

from godwit.bundle import load_config, save_config
from godwit.lab.bundles import read_count, write_bundle
from godwit.lab.testbed import Testbed

pytestmark = pytest.mark.integration

FUSE = {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666,
        "uid": 0, "gid": 0}
COUNT = "i=0; while :; do i=$((i+1)); echo $i > /count.tmp; mv /count.tmp /count; sleep 0.1; done"
# A container with a godwit address (--ip) gives itself another address inside its netns
# and listens on it: godwit makes such a netns afresh on the destination (external to
# CRIU: only a netns runc made is carried), so there CRIU cannot bind the listening
# socket again.
OWN_ADDRESS = "10.99.0.7"


def fuse_bundle(bundle_dir: Path) -> Path:
    """A counter that holds /dev/fuse open, a device CRIU 4.2.1 cannot dump."""
    bundle = write_bundle(bundle_dir, ["/bin/sh", "-c",
                                       f"exec 3<>/dev/fuse; trap 'exit 0' TERM; {COUNT}"])
    config = load_config(bundle)
    config["linux"]["devices"] = [FUSE]
    config["linux"]["resources"]["devices"].append(
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"})
    save_config(bundle, config)
    return bundle


def own_address_bundle(bundle_dir: Path) -> Path:
    script = (f"ip addr add {OWN_ADDRESS}/32 dev lo && httpd -p {OWN_ADDRESS}:8080 -h /; "
              f"trap 'exit 0' TERM; {COUNT}")
    bundle = write_bundle(bundle_dir, ["/bin/sh", "-c", script])
    config = load_config(bundle)
    for caps in config["process"]["capabilities"].values():
        caps.append("CAP_NET_ADMIN")
    save_config(bundle, config)
    return bundle


def start_counting(bed: Testbed, name: str, bundle: Path, *args: str) -> Path:
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", "a", *args)
    assert result.returncode == 0, result.stderr
    rootfs = bundle / "rootfs"
    wait_for(lambda: (read_count(rootfs) or 0) >= 3, what=f"{name} counting")
    return rootfs


def migrate_fails(bed: Testbed, name: str) -> dict:
    result = bed.godwit("migrate", name, "--to", "b", "--json", "--strategy", "stop-and-copy")
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode != 0 and report["result"] == "failed", report
    return report


def assert_runs_on_source(bed: Testbed, name: str, rootfs: Path) -> None:
    assert copies(bed, name) == [("a", "running")]
    before = read_count(rootfs) or 0
    wait_for(lambda: (read_count(rootfs) or 0) > before + 3, what=f"{name} counting on a")


def logs_of(bed: Testbed, report: dict) -> str:
    result = bed.godwit("report", report["id"][:8], "--logs")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dump_refused_by_criu_names_the_cause_and_keeps_the_log(bed: Testbed) -> None:
    rootfs = start_counting(bed, "fuse", fuse_bundle(bed.bundle_dir("fuse")))
    report = migrate_fails(bed, "fuse")
    assert report["error"] == ("dump failed: Can't dump file 3 of that type [20666] "
                               "(chr 10:229)"), report["error"]
    assert "resumed" in report["outcome"], report
    assert_runs_on_source(bed, "fuse", rootfs)
    shown = logs_of(bed, report)
    assert "==> source a: dump.log (" in shown, shown[:300]
    assert "Can't dump file 3 of that type" in shown and "Dumping FAILED." in shown
    assert "==> source a: runc-checkpoint.log (" in shown
    assert not list((bed.host("a").state_dir / "outgoing").glob("*")), "work dir is gone"
    as_json = cli_json(bed, "report", report["id"], "--logs")
    kept_on_b = sorted(e["name"] for e in as_json["b"])
    assert kept_on_b == ["lazy-pages.log", "page-server.log", "runc-restore.log"], \
        "CRIU never restored on b: only runc's called-off restore, the dump's page server " \
        "and the lazy-pages daemon started at arm"
    bed.godwit("rm", "fuse")


def test_restore_refused_by_criu_names_the_cause_and_keeps_both_hosts_logs(
        bed: Testbed) -> None:
    address = f"{list(bed.net.subnet.hosts())[200]}/{bed.net.subnet.prefixlen}"
    rootfs = start_counting(bed, "ownip", own_address_bundle(bed.bundle_dir("ownip")),
                            "--ip", address)
    report = migrate_fails(bed, "ownip")
    assert report["error"].startswith("restore failed on b: inet: Can't bind inet socket"), \
        report["error"]
    assert report["error"].endswith(": Cannot assign requested address"), report["error"]
    assert_runs_on_source(bed, "ownip", rootfs)
    shown = logs_of(bed, report)
    assert "==> source a: dump.log (" in shown and "Dumping finished successfully" in shown
    assert "==> destination b: restore.log (" in shown and "Restoring FAILED." in shown
    assert "==> destination b: runc-restore.log (" in shown
    assert shown.index("==> source a:") < shown.index("==> destination b:")
    bed.godwit("rm", "ownip")


def test_no_logs_kept_of_a_successful_migration(bed: Testbed) -> None:
    bundle = write_bundle(bed.bundle_dir("fine"), ["/bin/sh", "-c", COUNT])
    start_counting(bed, "fine", bundle)
    result = bed.godwit("migrate", "fine", "--to", "b", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, report
    shown = bed.godwit("report", report["id"][:8], "--logs")
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    assert shown.stderr.strip().count("\n") == 0 and "no logs kept" in shown.stderr
    staging = bed.host("b").state_dir / "incoming" / report["id"]
    assert not (staging / "work").exists(), "a committed migration's logs go"
    bed.godwit("rm", "fine")
