"""Containers run from images (an OCI layout and a docker-archive built on this machine by
godwit.lab.workloads.images): the image's config applied and overridable, whiteouts honoured,
provenance kept through a migration, and bad references refused in one line."""

from __future__ import annotations

import gzip
import io
import json
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_json
from netclient import Client

from godwit import network
from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed
from godwit.lab.workloads.images import TAG, WHITED_OUT, TestImage, netserver_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def image() -> TestImage:
    return netserver_image()


@pytest.fixture(scope="module")
def client_host(bed: Testbed) -> TestHost:
    return bed.net.add_host("cl")


@pytest.fixture
def started(bed: Testbed) -> Iterator[list[str]]:
    """Names of the containers a test starts; removed (wherever they are) afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        bed.godwit("rm", name)


def run_image(bed: Testbed, started: list[str], name: str, ref: str, *extra: str,
              ip: str | None = None) -> dict:
    net = ["--ip", f"{ip}/{bed.net.subnet.prefixlen}", "--gateway", bed.net.gateway] \
        if ip else []
    started.append(name)
    result = bed.godwit("run", name, "--image", ref, "--host", "a", "--json", *net, *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def row(bed: Testbed, name: str) -> dict:
    rows = [r for r in cli_json(bed, "ps")["containers"] if r["name"] == name]
    assert len(rows) == 1, rows
    return rows[0]


def manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(d["digest"] for d in index["manifests"]
                if d["annotations"]["org.opencontainers.image.ref.name"] == tag)


def archive_digest(archive: Path, work: Path) -> str:
    """The manifest digest of the archive as an OCI layout (skopeo converts it the same
    way every time)."""
    subprocess.run(["skopeo", "copy", "--quiet", f"docker-archive:{archive}",
                    f"oci:{work / 'layout'}:x"], check=True, capture_output=True)
    return manifest_digest(work / "layout", "x")


def init_process(bed: Testbed, name: str) -> dict:
    """What the container's PID 1 runs as: ids, argv, env, cwd (read from /proc/1)."""
    def read(*argv: str) -> str:
        result = bed.godwit("exec", name, "--", *argv)
        assert result.returncode == 0, result.stderr
        return result.stdout

    status = dict(line.split(":", 1) for line in read("cat", "/proc/1/status").splitlines())
    return {"uid": status["Uid"].split()[0], "gid": status["Gid"].split()[0],
            "groups": status["Groups"].split(),
            "argv": read("cat", "/proc/1/cmdline").split("\0")[:-1],
            "env": dict(e.split("=", 1) for e in read("cat", "/proc/1/environ").split("\0") if e),
            "cwd": read("readlink", "/proc/1/cwd").strip()}


@pytest.mark.parametrize(("kind", "strategy", "slot"), [
    ("oci", "stop-and-copy", 220),
    ("docker-archive", "post-copy", 221),
])
def test_server_from_an_image_migrates_with_its_provenance(
        bed: Testbed, client_host: TestHost, image: TestImage, started: list[str],
        tmp_path: Path, kind: str, strategy: str, slot: int) -> None:
    ref = image.oci_ref if kind == "oci" else image.archive_ref
    digest = manifest_digest(image.layout, TAG) if kind == "oci" \
        else archive_digest(image.archive, tmp_path)
    address = str(list(bed.net.subnet.hosts())[slot])
    name = f"img-{kind}"
    created = run_image(bed, started, name, ref, ip=address)
    assert (created["image"], created["image_digest"]) == (ref, digest)
    assert created["exposed_ports"] == ["7000/tcp", "7000/udp"]
    client = Client(client_host, address, socket.SOCK_STREAM)
    try:
        client.wait_replies(30)
        report = cli_json(bed, "migrate", name, "--to", "b", "--strategy", strategy)
        client.wait_replies(30)
    finally:
        client.close()
    print(f"\nimage {kind}, {strategy}: downtime {report['downtime_s'] * 1e3:.0f} ms, "
          f"client stall {client.max_stall() * 1e3:.0f} ms, rootfs {report['rootfs_bytes']} B")
    client.assert_stream_intact()
    assert report["result"] == "ok" and report["strategy"] == strategy
    assert (report["image"], report["image_digest"]) == (ref, digest)
    moved = row(bed, name)
    assert (moved["host"], moved["status"], moved["origin"]) == ("b", "running", "a")
    assert (moved["image"], moved["image_digest"]) == (ref, digest)
    assert moved["exposed_ports"] == ["7000/tcp", "7000/udp"]
    fresh = Client(client_host, address, socket.SOCK_STREAM)  # a new connection, on b
    try:
        fresh.wait_replies(10)
    finally:
        fresh.close()
    fresh.assert_stream_intact()
    table = bed.godwit("ps")
    assert f"{Path(ref).name}@{digest[7:19]}" in table.stdout, table.stdout


def layer_members(layout: Path) -> list[set[str]]:
    """The paths each layer of the test image holds, in order."""
    manifest_blob = manifest_digest(layout, TAG).removeprefix("sha256:")
    manifest = json.loads((layout / "blobs/sha256" / manifest_blob).read_text())
    layers = []
    for layer in manifest["layers"]:
        data = (layout / "blobs/sha256" / layer["digest"].removeprefix("sha256:")).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
            layers.append({m.name.removeprefix("./") for m in tar.getmembers()})
    return layers


def test_whiteouts_are_honoured(bed: Testbed, image: TestImage, started: list[str]) -> None:
    first, second = layer_members(image.layout)
    whiteout = str(Path(WHITED_OUT).with_name(".wh." + Path(WHITED_OUT).name))
    assert WHITED_OUT in first and whiteout in second, "the test image lost its whiteout"
    rootfs = Path(run_image(bed, started, "whiteout", image.oci_ref)["rootfs"])
    assert (rootfs / "bin/netserver").is_file(), "layer 1 is missing"
    assert not (rootfs / WHITED_OUT).exists() and not (rootfs / whiteout).exists()
    assert rootfs.parent == bed.host("a").state_dir / "containers" / "whiteout"


def test_image_config_is_applied(bed: Testbed, image: TestImage, started: list[str]) -> None:
    run_image(bed, started, "conf", image.archive_ref)
    process = init_process(bed, "conf")
    assert (process["uid"], process["gid"], process["groups"]) == ("1000", "1000", ["1001"])
    assert process["argv"] == ["/bin/netserver", "7000"]
    assert process["env"]["GREETING"] == "hello" and process["env"]["HOME"] == "/home/srv"
    assert process["env"]["PATH"] == "/bin:/sbin:/usr/bin:/usr/sbin"
    assert process["cwd"] == "/srv"


def test_command_line_overrides_win(bed: Testbed, image: TestImage,
                                    started: list[str]) -> None:
    run_image(bed, started, "over", image.oci_ref, "--env", "GREETING=bye", "-e", "EXTRA=x=y",
              "--user", "0:net", "--workdir", "/tmp", "--", "7001")
    process = init_process(bed, "over")
    assert (process["uid"], process["gid"], process["groups"]) == ("0", "1001", [])
    assert process["argv"] == ["/bin/netserver", "7001"], "ARGS replace Cmd only"
    assert process["env"]["GREETING"] == "bye" and process["env"]["EXTRA"] == "x=y"
    assert process["cwd"] == "/tmp"


def corrupt_archive(image: TestImage, work: Path) -> Path:
    bad = work / "truncated.tar"
    bad.write_bytes(image.archive.read_bytes()[:300_000])
    return bad


@pytest.mark.parametrize(("case", "message"), [
    ("no-dir", "no such directory"),
    ("not-layout", "not an OCI image layout"),
    ("unknown-tag", "no tag 'nope' in the layout (tags: netserver)"),
    ("corrupt-archive", "skopeo: loading tar component manifest.json"),
    ("no-archive", "no such file"),
    ("unknown-user", "oci:netserver: unknown user 'ghost'"),
    ("unknown-group", "unknown group 'ghosts'"),
    ("bad-ref", "invalid image reference 'docker://busybox'"),
    ("bad-env", "invalid --env entry 'NOEQUALS'"),
    ("bundle-and-image", "give either --bundle DIR or --image REF"),
    ("runc-refuses", "runc run failed"),  # unpacked and placed, then undone
])
def test_bad_references_are_refused_in_one_line(bed: Testbed, image: TestImage,
                                                tmp_path: Path, case: str,
                                                message: str) -> None:
    ref, extra = image.oci_ref, []
    if case == "no-dir":
        ref = f"oci:{tmp_path}/missing"
    elif case == "not-layout":
        ref = f"oci:{tmp_path}"
    elif case == "unknown-tag":
        ref = f"oci:{image.layout}:nope"
    elif case == "corrupt-archive":
        ref = f"docker-archive:{corrupt_archive(image, tmp_path)}"
    elif case == "no-archive":
        ref = f"docker-archive:{tmp_path}/missing.tar"
    elif case in ("unknown-user", "unknown-group"):
        extra = ["--user", "ghost" if case == "unknown-user" else "srv:ghosts"]
    elif case == "bad-ref":
        ref = "docker://busybox"
    elif case == "bad-env":
        extra = ["--env", "NOEQUALS"]
    elif case == "bundle-and-image":
        extra = ["--bundle", str(tmp_path)]
    elif case == "runc-refuses":
        extra = ["--workdir", "/bin/netserver"]
    result = bed.godwit("run", "bad", "--image", ref, "--host", "a", *extra)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    state = bed.host("a").state_dir
    assert not (state / "containers" / "bad").exists()
    assert not list((state / "unpacking").glob("*")), "an unpack was left behind"
    assert not network.netns_path(bed.host("a").netns, "bad").exists()
    assert "bad" not in [r["name"] for r in cli_json(bed, "ps")["containers"]]
