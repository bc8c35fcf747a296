"""What the real-application tests share: a container on host a made from a copy of the
cached rootfs, with its own address; a client program on host c; the migration a → b while
the client runs; and what the kernel says of the container's processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import copies

from godwit.bundle import save_config
from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed

# (strategy, shared storage): every app migrates in each of these four ways.
MIGRATIONS = [("stop-and-copy", False), ("stop-and-copy", True),
              ("post-copy", False), ("post-copy", True)]
MIGRATION_IDS = ["stop-and-copy-rootfs", "stop-and-copy-shared", "post-copy-rootfs",
                 "post-copy-shared"]
CLIENT_WARMUP_S = 3.0  # the client runs this long before the migration starts


@dataclass
class App:
    """A running application container and where to reach it."""

    bed: Testbed
    name: str
    address: str
    rootfs: Path


def new_bundle(bed: Testbed, name: str, cached_rootfs: Path) -> Path:
    """A bundle dir holding a private copy of the cached rootfs (config written later)."""
    bundle = bed.bundle_dir(name)
    bundle.mkdir(parents=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached_rootfs), str(bundle / "rootfs")],
                   check=True)
    return bundle


def start(bed: Testbed, name: str, bundle: Path, config: dict, host_index: int) -> App:
    """Run the bundle on host a with address number ``host_index`` of the testbed subnet."""
    save_config(bundle, config)
    address = str(list(bed.net.subnet.hosts())[host_index])
    result = bed.godwit("run", name, "--bundle", str(bundle), "--host", "a",
                        "--ip", f"{address}/{bed.net.subnet.prefixlen}",
                        "--gateway", bed.net.gateway)
    assert result.returncode == 0, result.stderr
    return App(bed, name, address, bundle / "rootfs")


def remove(app: App) -> None:
    """Remove the container and its bundle (the next test builds the same name afresh)."""
    app.bed.godwit("rm", app.name)
    shutil.rmtree(app.rootfs.parent, ignore_errors=True)


def user_ids(rootfs: Path, user: str) -> tuple[int, int, list[int]]:
    """uid, gid and supplementary gids of ``user`` from the rootfs's passwd and group."""
    entry = next(line.split(":") for line in (rootfs / "etc/passwd").read_text().splitlines()
                 if line.startswith(f"{user}:"))
    groups = [line.split(":") for line in (rootfs / "etc/group").read_text().splitlines()]
    extra = [int(g[2]) for g in groups if user in g[3].split(",") and int(g[2]) != int(entry[3])]
    return int(entry[2]), int(entry[3]), extra


@dataclass
class Client:
    """A client program running on the client host; its output goes to files."""

    argv: list[str]
    proc: subprocess.Popen
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Exit code and output so far, for an assertion message."""
        return (f"{self.argv[0]} exit {self.proc.poll()}: {self.out.read_text(errors='replace')}"
                f"{self.err.read_text(errors='replace')}")

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the exit; returns (exit code, stdout, stderr)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.argv[0]} still runs after {timeout} s") from None
        return code, self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str, str]:
        """Tell a client that runs until told to stop (``sig``), then wait for its exit."""
        self.proc.send_signal(sig)
        return self.finish(10)


def start_client(bed: Testbed, host: TestHost, argv: list[str], tag: str) -> Client:
    out, err = bed.work / f"{tag}.out", bed.work / f"{tag}.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = bed.net.run_in(host, argv, stdin=subprocess.DEVNULL, stdout=stdout,
                              stderr=stderr, preexec_fn=_default_stop_signals)
    return Client(argv, proc, out, err)


def _default_stop_signals() -> None:
    """`Client.stop` interrupts the client: a test run started in the background of a
    non-interactive shell (`scripts/test &`) ignores SIGINT, and children inherit that."""
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def run_client(bed: Testbed, host: TestHost, argv: list[str], stdin: bytes = b"",
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a client program on the client host to its end; output captured."""
    proc = bed.net.run_in(host, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    out, err = proc.communicate(stdin, timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def migrate_under_load(app: App, client: Client, strategy: str, shared: bool) -> dict:
    """After the client's warm-up, migrate a → b; the client must outlive the migration.
    Returns the report; asserts it is ok and the container runs on b only."""
    time.sleep(max(0.0, CLIENT_WARMUP_S - (time.monotonic() - client.started)))
    assert client.running(), f"the client ended before the migration: {client.output()}"
    args = ["migrate", app.name, "--to", "b", "--json", "--strategy", strategy]
    result = app.bed.godwit(*args, *(["--shared-storage"] if shared else []))
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    assert result.returncode == 0 and report.get("result") == "ok", result.stderr + result.stdout
    assert copies(app.bed, app.name) == [("b", "running")]
    assert client.running(), f"the client ended during the migration: {client.output()}"
    return report


def container_pid(app: App) -> int:
    rows = json.loads(app.bed.godwit("ps", "--json").stdout)["containers"]
    return next(r["pid"] for r in rows if r["name"] == app.name and r["status"] == "running")


@dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    uid: int
    gids: tuple[int, ...]
    rss_kib: int


def processes(app: App) -> list[Proc]:
    """The container's init and all its descendants, with real uid, groups and RSS."""
    found, todo = [], [container_pid(app)]
    while todo:
        pid = todo.pop()
        found.append(_proc(pid))
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += [int(child) for child in (task / "children").read_text().split()]
    return found


def _proc(pid: int) -> Proc:
    fields = dict(line.split(":\t", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    rss = int(fields.get("VmRSS", "0 kB").split()[0])
    gids = tuple(int(g) for g in fields["Groups"].split())
    return Proc(pid, fields["Name"].strip(), int(fields["Uid"].split()[0]), gids, rss)


def record(app: App, report: dict, shared: bool, **extra: object) -> None:
    """Print what the coordinator tunes the auto strategy with (pytest -s shows it)."""
    procs = processes(app)
    memory = next(r["memory"] for r in json.loads(app.bed.godwit("ps", "--json").stdout)
                  ["containers"] if r["name"] == app.name)
    figures = {"app": app.name, "strategy": report["strategy"],
               "shared": shared,
               "downtime_s": round(report["downtime_s"], 3), "total_s": round(report["total_s"], 2),
               "rss_mib": round(sum(p.rss_kib for p in procs) / 1024, 1),
               "cgroup_mib": round(memory / 2**20, 1), "processes": len(procs),
               "image_mib": round(report.get("image_bytes", 0) / 2**20, 1),
               "rootfs_mib": round(report.get("rootfs_bytes", 0) / 2**20, 1), **extra,
               "phases": {ph["name"]: round(ph["seconds"], 3) for ph in report.get("phases", [])}}
    print(f"\nrealapps: {json.dumps(figures)}")

