"""Agents on Debian's runc 1.1 and on the current runc (scripts/runc-current): what they
report, what pre-flight makes of them, and a migration between the two."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _current_runc, cli_json, copies, wait_for

from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.testbed import Testbed
from godwit.runc import DEFAULT_RUNC, Runc
from godwit.runc_features import series

pytestmark = pytest.mark.integration


def runc_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].removeprefix("runc version ")


def test_agents_report_their_runc_and_its_checkpoint_features(any_bed: Testbed) -> None:
    info = cli_json(any_bed, "hosts")["a"]
    features = info["runc_features"]
    assert info["runc"] == features["version"] == runc_version(features["binary"])
    assert features["checkpoint"] and features["lazy_dump"] and features["lazy_restore"]
    assert features["pre_dump"]


@pytest.fixture
def b_on_current_runc(bed: Testbed) -> Iterator[str]:
    """Host b's agent restarted on the current runc (a on Debian's); yields its version."""
    current = _current_runc()
    bed.stop_agent("b")
    try:
        bed.start_agent("b", "--runc", current)
        yield runc_version(current)
    finally:
        bed.stop_agent("b")
        bed.start_agent("b")


def test_pre_flight_warns_of_another_runc_release(bed: Testbed, b_on_current_runc: str) -> None:
    local = runc_version(DEFAULT_RUNC)
    assert series(local) != series(b_on_current_runc), "the test needs two runc releases"
    findings = cli_json(bed, "check", "b", "--from", "a")["a"]["findings"]
    runc = [f for f in findings if f["check"] == "runc"]
    assert [f["level"] for f in runc] == ["warn"], runc
    assert local in runc[0]["message"] and b_on_current_runc in runc[0]["message"]


def rootfs_of(bed: Testbed, name: str) -> Path:
    return Path(next(r["rootfs"] for r in cli_json(bed, "ps")["containers"]
                     if r["name"] == name))


def test_counter_migrates_between_runc_releases(bed: Testbed, b_on_current_runc: str) -> None:
    """Dumped by runc 1.1 and restored by the current runc, then back: the count goes on."""
    bundle = counter_bundle(bed.bundle_dir("xver"))
    result = bed.godwit("run", "xver", "--bundle", str(bundle), "--host", "a")
    assert result.returncode == 0, result.stderr
    try:
        for to in ("b", "a"):
            source_rootfs = rootfs_of(bed, "xver")
            before = wait_for(lambda r=source_rootfs: (c := read_count(r) or 0) >= 10 and c,
                              what="counter")
            report = cli_json(bed, "migrate", "xver", "--to", to)
            assert report["result"] == "ok", report
            assert copies(bed, "xver") == [(to, "running")]
            # a restarted shell would count from 1 again; the migrated one goes on
            dest_rootfs = rootfs_of(bed, "xver")
            after = wait_for(lambda r=dest_rootfs: read_count(r), what="count")
            assert after >= before, f"counter restarted at {to}: {after} after {before}"
    finally:
        bed.godwit("rm", "xver")


def fake_runc(path: Path, version: str) -> None:
    """A `runc` that prints `version` and counts its calls in `<path>.calls`."""
    path.write_text(f"#!/bin/sh\necho x >> {path}.calls\necho 'runc version {version}'\n")
    path.chmod(0o755)


def test_runc_version_is_asked_again_only_after_an_upgrade(tmp_path: Path) -> None:
    binary = tmp_path / "runc"
    fake_runc(binary, "1.1.5")
    runc = Runc(tmp_path / "root", binary=str(binary))
    assert [asyncio.run(runc.version()) for _ in range(3)] == ["1.1.5"] * 3
    assert len(Path(f"{binary}.calls").read_text().split()) == 1
    replacement = tmp_path / "runc.new"
    fake_runc(replacement, "1.3.0")
    replacement.rename(binary)  # as a package upgrade replaces it
    assert asyncio.run(runc.version()) == "1.3.0"
