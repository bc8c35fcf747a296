"""The demo: two hosts on this machine, a counting container, one live migration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from godwit.bundle import counter_bundle, read_count
from godwit.errors import GodwitError
from godwit.netns import pick_free_subnet
from godwit.testbed import Testbed

console = Console()


def run_demo(keep: bool = False) -> None:
    """Create hosts a and b, start a counter on a, migrate it to b, show it kept counting."""
    _check_machine()
    console.rule("[bold]godwit demo")
    console.print("creating hosts [bold]a[/] and [bold]b[/] (network namespaces + agents)")
    bed = Testbed(["a", "b"], prefix="gwdemo", subnet=pick_free_subnet())
    with bed:
        _show(bed, "hosts")
        bundle = counter_bundle(bed.bundle_dir("counter"))
        _show(bed, "run", "counter", "--bundle", str(bundle), "--host", "a")
        rootfs = bundle / "rootfs"
        _watch_counter(rootfs, "on a", seconds=2)
        frozen_at = read_count(rootfs)
        _show(bed, "migrate", "counter", "--to", "b", live=True)
        dest_rootfs = bed.host("b").state_dir / "containers" / "counter" / "rootfs"
        _watch_counter(dest_rootfs, "on b", seconds=2)
        after = read_count(dest_rootfs) or 0
        _show(bed, "ps")
        verdict = "kept counting" if after > (frozen_at or 0) else "did NOT keep counting"
        console.print(f"[bold]the counter was {frozen_at} on a and is {after} on b: "
                      f"its in-memory state {verdict}[/]")
        if keep:
            console.print(f"hosts kept; CLI config: GODWIT_CONFIG={bed.config_path}; "
                          "press Ctrl-C to tear down")
            _wait_forever()
        console.print("cleaning up")
    if after <= (frozen_at or 0):
        raise GodwitError("demo failed: the counter did not continue after migration")


def _check_machine() -> None:
    if os.geteuid() != 0:
        raise GodwitError("the demo needs root (network namespaces, runc, CRIU)")
    for tool in ("runc", "criu"):
        if not shutil.which(tool):
            raise GodwitError(f"{tool} not found: run scripts/setup first")
    if subprocess.run(["criu", "check"], capture_output=True).returncode != 0:
        raise GodwitError("`criu check` fails on this kernel: run scripts/setup to build CRIU 4")


def _show(bed: Testbed, *args: str, live: bool = False) -> None:
    """Print and run a godwit command the way an operator would type it."""
    console.print(f"\n[bold cyan]$ godwit {' '.join(args)}[/]")
    if live:
        env = {**os.environ, "GODWIT_CONFIG": str(bed.config_path)}
        argv = [sys.executable, "-m", "godwit", *args]
        code = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL).returncode
    else:
        result = bed.godwit(*args)
        console.print(result.stdout.rstrip(), highlight=False)
        code = result.returncode
        if result.stderr.strip():
            console.print(result.stderr.rstrip(), style="red", highlight=False)
    if code != 0:
        raise GodwitError(f"`godwit {args[0]}` failed in the demo")


def _watch_counter(rootfs: Path, where: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        console.print(f"  counter {where}: {read_count(rootfs)}")
        time.sleep(0.5)


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
