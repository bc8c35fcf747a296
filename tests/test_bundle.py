"""OCI bundles (godwit.bundle) and the memhog workload, run with real runc/CRIU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from godwit.bundle import load_config, oci_config, rewrite_for_host, save_config
from godwit.cgroups import remove_empty
from godwit.lab.bundles import counter_bundle, make_busybox_rootfs, read_count, write_bundle
from godwit.lab.workloads import build_memhog, memhog_bundle, read_state
from godwit.runc import DEFAULT_RUNC

root_only = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which(DEFAULT_RUNC), reason="needs root and runc"
)
CGROUP_PARENT = f"gwt{os.getpid()}"


def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


class Runc:
    """Minimal runc driver for tests: one ``--root`` = one simulated host."""

    def __init__(self, root: Path, host: str) -> None:
        self.root, self.host, self.log = root, host, root.parent / f"runc-{host}.log"

    def cgroups_path(self, cid: str) -> str:
        return f"/godwit/{CGROUP_PARENT}-{self.host}/{cid}"

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [DEFAULT_RUNC, "--root", str(self.root), "--log", str(self.log), *args]
        # Container stdio = runc's stdio: keep it /dev/null so CRIU can dump it.
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, text=True, check=False)  # fmt: skip
        if proc.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv} failed ({proc.returncode}):\n{log}")
        return proc

    def status(self, cid: str) -> str:
        out = subprocess.run([DEFAULT_RUNC, "--root", str(self.root), "state", cid],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return json.loads(out)["status"]

    def ids(self) -> list[str]:
        return [p.parent.name for p in self.root.glob("*/state.json")]


@pytest.fixture
def runc_host(tmp_path: Path) -> Iterator[Callable[[str], Runc]]:
    """Factory of per-host runc drivers; deletes every container and cgroup afterwards."""
    hosts: list[Runc] = []

    def make(host: str) -> Runc:
        hosts.append(Runc(tmp_path / f"runc-{host}", host))
        return hosts[-1]

    try:
        yield make
    finally:
        for runc in hosts:
            for cid in runc.ids():
                with contextlib.suppress(RuntimeError):
                    runc("delete", "--force", cid)
        remove_empty(f"godwit/{CGROUP_PARENT}-*")


def test_oci_config_is_complete() -> None:
    cfg = oci_config(["/bin/sh"], env={"A": "1"}, hostname="h", cgroups_path="/godwit/x/c")
    proc = cfg["process"]
    assert proc["terminal"] is False and proc["args"] == ["/bin/sh"] and proc["cwd"] == "/"
    assert "A=1" in proc["env"] and any(e.startswith("PATH=") for e in proc["env"])
    assert set(proc["capabilities"]) == {"bounding", "effective", "permitted", "ambient"}
    assert "CAP_KILL" in proc["capabilities"]["bounding"]
    assert cfg["root"] == {"path": "rootfs", "readonly": False}
    assert cfg["hostname"] == "h" and cfg["linux"]["cgroupsPath"] == "/godwit/x/c"
    types = {ns["type"] for ns in cfg["linux"]["namespaces"]}
    assert types == {"pid", "ipc", "uts", "mount", "network"}
    mounts = {m["destination"]: m["type"] for m in cfg["mounts"]}
    assert mounts == {
        "/proc": "proc",
        "/dev": "tmpfs",
        "/dev/pts": "devpts",
        "/dev/shm": "tmpfs",
        "/dev/mqueue": "mqueue",
        "/sys": "sysfs",
    }
    assert "/proc/kcore" in cfg["linux"]["maskedPaths"]
    assert "/proc/sys" in cfg["linux"]["readonlyPaths"]


def test_oci_config_options() -> None:
    cfg = oci_config(["x"], env=["A=1", "PATH=/bin"], readonly=True, network_ns_path="/run/n")
    assert cfg["process"]["env"].count("PATH=/bin") == 1
    assert cfg["root"]["readonly"] is True and "cgroupsPath" not in cfg["linux"]
    assert {"type": "network", "path": "/run/n"} in cfg["linux"]["namespaces"]


def test_oci_config_user_and_capabilities() -> None:
    assert oci_config(["x"])["process"]["user"] == {"uid": 0, "gid": 0}
    root = oci_config(["x"], capabilities=["CAP_SETUID", "CAP_SETGID"])["process"]
    assert root["capabilities"]["ambient"] == ["CAP_SETUID", "CAP_SETGID"]
    proc = oci_config(["x"], uid=101, gid=103, additional_gids=[104])["process"]
    assert proc["user"] == {"uid": 101, "gid": 103, "additionalGids": [104]}
    assert proc["capabilities"]["ambient"] == [], "a non-root process holds no capability"
    assert proc["capabilities"]["bounding"] == ["CAP_AUDIT_WRITE", "CAP_KILL",
                                                "CAP_NET_BIND_SERVICE"]


def test_rewrite_for_host_returns_new_dict(tmp_path: Path) -> None:
    cfg = oci_config(["x"], cgroups_path="/godwit/a/c")
    new = rewrite_for_host(cfg, rootfs=tmp_path / "r", cgroups_path="/godwit/b/c")
    assert new["root"]["path"] == str(tmp_path / "r") and Path(new["root"]["path"]).is_absolute()
    assert new["linux"]["cgroupsPath"] == "/godwit/b/c"
    assert cfg["root"]["path"] == "rootfs" and cfg["linux"]["cgroupsPath"] == "/godwit/a/c"


def test_write_and_load_bundle(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", ["/bin/true"], hostname="box")
    assert load_config(bundle) == oci_config(["/bin/true"], hostname="box")
    rootfs = bundle / "rootfs"
    assert os.readlink(rootfs / "bin/sh") == "/bin/busybox"
    assert (rootfs / "etc/hostname").read_text() == "box\n"
    assert (rootfs / "etc/passwd").read_text().startswith("root:x:0:0:")
    out = subprocess.run(
        [str(rootfs / "bin/busybox"), "echo", "ok"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "ok\n"
    make_busybox_rootfs(rootfs)  # idempotent


def test_read_state_parses_lines(tmp_path: Path) -> None:
    assert read_state(tmp_path) == {}
    (tmp_path / "state").write_text("verified mib=4 checksum=123 expected=123 ok=1 counter=9\n")
    assert read_state(tmp_path) == {
        "status": "verified",
        "mib": 4,
        "checksum": 123,
        "expected": 123,
        "ok": 1,
        "counter": 9,
    }


def test_build_memhog_is_cached(tmp_path: Path) -> None:
    first = build_memhog(tmp_path)
    assert first.name.startswith("memhog-") and os.access(first, os.X_OK)
    mtime = first.stat().st_mtime_ns
    assert build_memhog(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_memhog_runs_natively(tmp_path: Path) -> None:
    proc = subprocess.Popen([str(build_memhog()), "4", "9", str(tmp_path / "state"), "200"])
    try:
        ready = wait_for(
            lambda: read_state(tmp_path).get("counter", 0) > 5 and read_state(tmp_path)
        )
        assert ready["status"] == "ready" and ready["mib"] == 4 and ready["seed"] == 9
        proc.send_signal(signal.SIGUSR1)
        done = wait_for(
            lambda: read_state(tmp_path).get("status") == "verified" and read_state(tmp_path)
        )
        assert done["ok"] == 1 and done["checksum"] == done["expected"] and done["dirtied"] > 0
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.integration
@root_only
def test_counter_bundle_counts(tmp_path: Path, runc_host: Callable[[str], Runc]) -> None:
    runc = runc_host("a")
    bundle = counter_bundle(tmp_path / "counter", cgroups_path=runc.cgroups_path("counter"))
    runc("run", "--detach", "--bundle", str(bundle), "counter")
    first = wait_for(lambda: read_count(bundle / "rootfs"), what="first count")
    wait_for(lambda: (read_count(bundle / "rootfs") or 0) >= first + 5, what="count +5")
    runc("kill", "counter", "TERM")
    wait_for(lambda: runc.status("counter") == "stopped", what="stopped on SIGTERM")
    runc("delete", "counter")
    assert runc.ids() == []


def verify(runc: Runc, cid: str, rootfs: Path) -> dict[str, Any]:
    """SIGUSR1 memhog and return the resulting ``verified`` state."""
    before = read_state(rootfs).get("verifications", 0)
    runc("kill", cid, "USR1")
    return wait_for(
        lambda: (s := read_state(rootfs)).get("verifications", 0) > before and s,
        what="verification",
    )


@pytest.mark.integration
@root_only
def test_memhog_checkpoint_restore_round_trip(
    tmp_path: Path, runc_host: Callable[[str], Runc]
) -> None:
    src, dst = runc_host("a"), runc_host("b")
    bundle = memhog_bundle(tmp_path / "src", 64, seed=5, cgroups_path=src.cgroups_path("mh"))
    rootfs = bundle / "rootfs"
    src("run", "--detach", "--bundle", str(bundle), "mh")
    ready = wait_for(lambda: (s := read_state(rootfs)).get("status") == "ready" and s)
    assert ready["mib"] == 64 and ready["seed"] == 5
    assert verify(src, "mh", rootfs)["ok"] == 1

    images = tmp_path / "images"
    src("checkpoint", "--image-path", str(images), "--work-path", str(tmp_path / "work"), "mh")
    assert src.ids() == []
    at_dump = read_state(rootfs)
    time.sleep(0.5)
    assert read_state(rootfs) == at_dump  # really stopped

    dst_bundle = tmp_path / "dst"
    dst_bundle.mkdir()
    shutil.copytree(rootfs, dst_bundle / "rootfs", symlinks=True)
    save_config(
        dst_bundle,
        rewrite_for_host(
            load_config(bundle), rootfs=dst_bundle / "rootfs", cgroups_path=dst.cgroups_path("mh")
        ),
    )
    dst_work = str(tmp_path / "work-dst")
    dst("restore", "--detach", "--image-path", str(images), "--work-path", dst_work,
        "--bundle", str(dst_bundle), "mh")  # fmt: skip
    dst_rootfs = dst_bundle / "rootfs"
    wait_for(lambda: read_state(dst_rootfs)["counter"] > at_dump["counter"] + 5, what="counter")
    after = verify(dst, "mh", dst_rootfs)
    assert after["ok"] == 1 and after["verifications"] == at_dump["verifications"] + 1
    assert after["counter"] > at_dump["counter"] and after["dirtied"] >= at_dump["dirtied"]
    cgroup = Path(f"/proc/{container_pid(dst, 'mh')}/cgroup").read_text()
    assert f":{dst.cgroups_path('mh')}\n" in cgroup


def container_pid(runc: Runc, cid: str) -> int:
    state = runc.root / cid / "state.json"
    return int(json.loads(state.read_text())["init_process_pid"])
