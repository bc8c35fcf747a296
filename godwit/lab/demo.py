"""The demo: two hosts on this machine, live migrations of a counting container and of a
TCP server whose client keeps one connection open and a request every 10 ms in flight."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from godwit.errors import GodwitError
from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.netns import TestHost, pick_free_subnet
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import netserver_bundle
from godwit.network import in_netns

console = Console()
SERVER_PORT = 7000
REQUEST_INTERVAL_S = 0.01
PNG_COPY = Path("/tmp/godwit-demo-timeline.png")


def run_demo(keep: bool = False) -> None:
    """Hosts a and b: a counter and a TCP server move a → b; show both kept going."""
    _check_machine()
    console.rule("[bold]godwit demo")
    failures: list[str] = []
    with _testbed() as bed:
        _show(bed, "hosts")
        failures += _counter_act(bed)
        migration_id, tcp_failures = _tcp_act(bed)
        failures += tcp_failures
        _show(bed, "ps")
        _show(bed, "history")
        _timeline(bed, migration_id, keep)
        if keep:
            console.print(f"hosts kept; CLI config: GODWIT_CONFIG={bed.config_path}; "
                          "press Ctrl-C to tear down")
            _wait_forever()
    if failures:
        raise GodwitError("demo failed: " + "; ".join(failures))
    console.print("[bold green]demo passed:[/] both containers moved a → b and kept going")


def _check_machine() -> None:
    if os.geteuid() != 0:
        raise GodwitError("the demo needs root (network namespaces, runc, CRIU)")
    for tool in ("runc", "criu", "iptables", "nsenter"):
        if not shutil.which(tool):
            raise GodwitError(f"{tool} not found: run scripts/setup first")
    if subprocess.run(["criu", "check"], capture_output=True).returncode != 0:
        raise GodwitError("`criu check` fails on this kernel: run scripts/setup to build CRIU 4")


@contextmanager
def _testbed() -> Iterator[Testbed]:
    """The demo's hosts; torn down at exit, a second Ctrl-C cannot interrupt that."""
    console.print("creating hosts [bold]a[/] and [bold]b[/] (network namespaces + agents)")
    bed = Testbed(["a", "b"], prefix="gwdemo", subnet=pick_free_subnet())
    bed.__enter__()  # removes what it created if it fails
    try:
        yield bed
    finally:
        console.print("cleaning up")
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            bed.close()
        finally:
            signal.signal(signal.SIGINT, previous)


def _cli_env(bed: Testbed) -> dict[str, str]:
    return {**os.environ, "GODWIT_CONFIG": str(bed.config_path)}


def _show(bed: Testbed, *args: str, live: bool = False) -> str:
    """Print and run a godwit command the way an operator would type it; return stdout."""
    console.print(f"\n[bold cyan]$ godwit {' '.join(args)}[/]")
    if live:
        argv = [sys.executable, "-m", "godwit", *args]
        code = subprocess.run(argv, env=_cli_env(bed), stdin=subprocess.DEVNULL).returncode
        out = ""
    else:
        result = bed.godwit(*args)
        out, code = result.stdout, result.returncode
        console.print(out.rstrip(), highlight=False)
        if result.stderr.strip():
            console.print(result.stderr.rstrip(), style="red", highlight=False)
    if code != 0:
        raise GodwitError(f"`godwit {args[0]}` failed in the demo")
    return out


# Act 1: in-memory state (a shell counting in a variable) continues on the other host.

def _counter_act(bed: Testbed) -> list[str]:
    console.rule("[bold]1. a counting shell: its memory moves with it", style="dim")
    bundle = counter_bundle(bed.bundle_dir("counter"))
    _show(bed, "run", "counter", "--bundle", str(bundle), "--host", "a")
    before = _watch_counter(bundle / "rootfs", "on a", seconds=1.5)[-1]
    _show(bed, "migrate", "counter", "--to", "b", live=True)
    dest_rootfs = bed.host("b").state_dir / "containers" / "counter" / "rootfs"
    after = _watch_counter(dest_rootfs, "on b", seconds=1.5)
    ok = after[0] >= before and after[-1] > after[0]
    verdict = "[green]kept counting[/]" if ok else "[red]did NOT keep counting[/]"
    console.print(f"[bold]the counter was {before} on a and went on {after[0]} → {after[-1]} "
                  f"on b: its in-memory state {verdict}[/]")
    return [] if ok else ["the counter did not continue after migration"]


def _watch_counter(rootfs: Path, where: str, seconds: float) -> list[int]:
    values: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        values.append(read_count(rootfs) or 0)
        console.print(f"  counter {where}: {values[-1]}")
        time.sleep(0.5)
    return values


# Act 2: a TCP server keeps its address and its client's connection.

def _tcp_act(bed: Testbed) -> tuple[str, list[str]]:
    """Migrate srv while a client talks to it; return the migration id and failures."""
    console.rule("[bold]2. a TCP server: its address and open connection move with it",
                 style="dim")
    address = _start_server(bed)
    client_host = bed.net.add_host("client")
    console.print(f"host [bold]client[/] ({client_host.address}) opens ONE TCP "
                  f"connection to {address}:{SERVER_PORT}, one numbered request every 10 ms")
    resets = _tcp_resets(client_host)
    with TcpClient(client_host, address) as client:
        with Live(client, console=console, refresh_per_second=10) as live:
            time.sleep(1.0)
            _migrate_streamed(bed, live, "migrate", "srv", "--to", "b")
            time.sleep(1.5)
        if not console.is_terminal:  # Live leaves its last line unterminated in a log
            console.line()
        client.finish()
    report = _last_report(bed, "srv")
    return report["id"], _tcp_verdict(client, report, _tcp_resets(client_host) - resets)


def _start_server(bed: Testbed) -> str:
    """`godwit run srv --ip` on host a: netserver with its own address on a's bridge."""
    address = str(list(bed.net.subnet.hosts())[200])
    bundle = netserver_bundle(bed.bundle_dir("srv"), SERVER_PORT)
    _show(bed, "run", "srv", "--bundle", str(bundle), "--host", "a",
          "--ip", f"{address}/{bed.net.subnet.prefixlen}", "--gateway", bed.net.gateway)
    return address


def _migrate_streamed(bed: Testbed, live: Live, *args: str) -> None:
    """Run the CLI with its output through ``live``, so the client line stays below it."""
    live.console.print(f"\n[bold cyan]$ godwit {' '.join(args)}[/]")
    env = {**_cli_env(bed), "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0",
           "COLUMNS": str(console.width), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "godwit", *args]
    with subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        try:
            for line in proc.stdout or ():
                live.console.print(Text.from_ansi(line.rstrip("\n")))
        finally:
            if proc.poll() is None:
                proc.terminate()
    if proc.returncode != 0:
        raise GodwitError(f"`godwit {args[0]}` failed in the demo")


def _last_report(bed: Testbed, container: str) -> dict:
    result = bed.godwit("history", "--json")
    reports = [r for r in json.loads(result.stdout or "[]") if r["container"] == container]
    if result.returncode != 0 or not reports:
        raise GodwitError(f"no migration of {container} in `godwit history`")
    return reports[-1]


def _tcp_resets(host: TestHost) -> int:
    """EstabResets of the host's netns: connections killed by a RST."""
    text = in_netns(host.netns, lambda: Path("/proc/thread-self/net/snmp").read_text())
    head, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(values[head.index("EstabResets")])


def _tcp_verdict(client: TcpClient, report: dict, resets: int) -> list[str]:
    s = client.summary()
    same = client.error is None and resets == 0
    ok = same and s.lost == 0 and s.duplicated == 0 and s.miscounted == 0
    style = "green" if ok else "red"
    console.print(
        f"[bold {style}]{'same' if same else 'BROKEN'} connection[/] {client.name}: "
        f"[bold]{s.requests}[/] requests, [bold {style}]{s.lost} lost, {s.duplicated} "
        f"duplicated[/]\nlongest stall [bold]{s.stall_s * 1e3:.0f} ms[/] vs godwit's "
        f"reported downtime [bold]{(report.get('downtime_s') or 0) * 1e3:.0f} ms[/] "
        f"({report.get('held_packets', 0)} packets held on b until the restore, then let through)")
    failures = [f"the TCP connection broke ({client.error or 'reset'})"] if not same else []
    failures += [f"{s.lost} TCP requests lost"] if s.lost else []
    failures += [f"{s.duplicated} TCP requests duplicated"] if s.duplicated else []
    failures += [f"the server miscounted {s.miscounted} requests"] if s.miscounted else []
    return failures


def _timeline(bed: Testbed, migration_id: str, keep: bool) -> None:
    """`godwit report ID --png` into the work dir (copied to /tmp: the work dir goes)."""
    png = bed.work / "timeline.png"
    out = _show_quiet(bed, "report", migration_id[:8], "--png", str(png))
    if keep:
        console.print(out)
    else:
        shutil.copy2(png, PNG_COPY)
        console.print(f"timeline written to {PNG_COPY} (copied: the work dir goes at exit)")


def _show_quiet(bed: Testbed, *args: str) -> str:
    """Like `_show` but only return the last line (the report table was shown already)."""
    console.print(f"\n[bold cyan]$ godwit {' '.join(args)}[/]")
    result = bed.godwit(*args)
    if result.returncode != 0:
        raise GodwitError(f"`godwit {args[0]}` failed in the demo: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


@dataclass
class Summary:
    requests: int
    lost: int
    duplicated: int
    miscounted: int
    stall_s: float


class TcpClient:
    """ONE TCP connection from a client host to netserver: request ``N`` every 10 ms, reply
    ``N C`` where C counts what the server got on this connection (so C == N throughout)."""

    def __init__(self, host: TestHost, address: str) -> None:
        self.sock = _connect(host, address, SERVER_PORT)
        local, peer = self.sock.getsockname(), self.sock.getpeername()
        self.name = f"{local[0]}:{local[1]} → {peer[0]}:{peer[1]}"
        self.sent = 0
        self.numbers: list[int] = []
        self.counts: list[int] = []
        self.last_reply = time.monotonic()
        self.stall_s = 0.0
        self.error: str | None = None
        self._closing = False
        self._sending = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]

    def __enter__(self) -> TcpClient:
        self._sending.set()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sending.clear()
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(2)
        self.sock.close()

    def finish(self, timeout: float = 2.0) -> None:
        """Stop sending and wait for the replies still in flight."""
        self._sending.clear()
        deadline = time.monotonic() + timeout
        while len(self.numbers) < self.sent and time.monotonic() < deadline and not self.error:
            time.sleep(0.01)

    def _send(self) -> None:
        while self._sending.is_set():
            try:
                self.sock.sendall(f"{self.sent + 1}\n".encode())
            except OSError as exc:
                self._fail(f"send: {exc}")
                return
            self.sent += 1
            time.sleep(REQUEST_INTERVAL_S)

    def _recv(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError as exc:
                self._fail(f"recv: {exc}")
                return
            if not data:
                self._fail("connection closed by the server")
                return
            *lines, buf = (buf + data).split(b"\n")
            self._got([tuple(map(int, line.split())) for line in lines if line])

    def _fail(self, message: str) -> None:
        if not self._closing and self.error is None:
            self.error = message

    def _got(self, replies: list[tuple[int, ...]]) -> None:
        now = time.monotonic()
        if replies:
            self.stall_s = max(self.stall_s, now - self.last_reply)
            self.last_reply = now
        for number, count in replies:
            self.numbers.append(number)
            self.counts.append(count)

    def summary(self) -> Summary:
        unique = set(self.numbers)
        miscounted = sum(n != c for n, c in zip(self.numbers, self.counts, strict=True))
        return Summary(self.sent, self.sent - len(unique), len(self.numbers) - len(unique),
                       miscounted, self.stall_s)

    def __rich__(self) -> Text:
        """The live line: replies, the server's count, the longest stall."""
        stalled = self._sending.is_set() and not self.error
        waiting = time.monotonic() - self.last_reply if stalled else 0.0
        line = Text.assemble(
            ("  client ", "bold"), (f"{len(self.numbers):>5}", "bold green"), " replies   ",
            "server count ", (f"{self.counts[-1] if self.counts else 0:>5}", "bold green"),
            "   longest stall ", (f"{max(self.stall_s, waiting) * 1e3:>4.0f} ms", "bold"))
        if self.error:
            line.append(f"   {self.error}", style="bold red")
        elif waiting > 0.05:
            line.append(f"   no reply for {waiting * 1e3:.0f} ms…", style="yellow")
        return line


def _connect(host: TestHost, address: str, port: int, timeout: float = 10) -> socket.socket:
    """Connect from inside the host's netns, retrying until the server listens."""

    def connect() -> socket.socket:
        sock = socket.create_connection((address, port), timeout=1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.5)
        return sock

    deadline = time.monotonic() + timeout
    while True:
        try:
            return in_netns(host.netns, connect)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise GodwitError(f"cannot connect to {address}:{port}: {exc}") from exc
            time.sleep(0.1)


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
