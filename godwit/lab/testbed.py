"""A throwaway cluster on this machine: netns hosts, each with a running agent, and a CLI
config that knows them. Used by the demo, the integration tests and the benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from godwit.api import DEFAULT_PORT
from godwit.fsio import atomic_write
from godwit.lab import labfs
from godwit.lab.netns import HostNetwork, TestHost, cleanup_stale
from godwit.lab.resource import Resource
from godwit.pki import CertificateAuthority
from godwit.tls import client_context

AGENT_START_TIMEOUT_S = 15
# What the lab's workloads need beyond godwit's default admission policy (runc's 3).
LAB_CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_SETGID",
                    "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_RAW", "CAP_MKNOD",
                    "CAP_SYS_CHROOT", "CAP_NET_ADMIN"]
LAB_DEVICES = [{"type": "c", "major": 10, "minor": 229}]  # /dev/fuse


class Testbed(Resource):
    """`with Testbed(["a", "b"]) as bed:` gives hosts with agents; everything goes at exit."""

    __test__ = False  # not a pytest test class

    def __init__(self, hosts: list[str], *, prefix: str = "gwt",
                 subnet: str = "10.231.0.0/24", agent_args: list[str] = (),
                 runc: str | None = None) -> None:
        """`runc`: the runc binary of every agent (`godwit agent --runc`)."""
        self.agent_args = [*(["--runc", runc] if runc else []), *agent_args]
        self.names = hosts
        self.prefix = prefix
        self.net = HostNetwork(prefix=prefix, subnet=subnet,
                               base_dir=Path(f"/run/godwit-{prefix}"))
        self.fs_image = Path(f"/var/tmp/godwit-{prefix}.img")  # the hosts' journaled ext4
        self.work = Path(tempfile.mkdtemp(prefix=f"godwit-{prefix}-", dir="/var/tmp"))
        self.config_path = self.work / "cli.json"
        self.agents: dict[str, subprocess.Popen] = {}
        self.policy_extra: dict = {}

    def start(self) -> None:
        """The hosts (their state on a journaled ext4 of the testbed's own, see
        `godwit.lab.labfs`), the CLI's config, an agent on each (leftovers of a killed run
        of the same prefix go first)."""
        cleanup_stale(self.prefix, base_dir=self.net.base_dir)
        labfs.mount_journaled(self.net.base_dir, self.fs_image)
        for name in self.names:
            self.net.add_host(name, container_bridge=True)
        self._write_cli_config()
        for name in self.names:
            self.start_agent(name)

    def close(self) -> None:
        for name in list(self.agents):
            self.stop_agent(name)
        self.net.destroy()
        labfs.unmount(self.net.base_dir, self.fs_image)
        shutil.rmtree(self.work, ignore_errors=True)

    def host(self, name: str) -> TestHost:
        return self.net.hosts[name]

    def address(self, name: str) -> str:
        return f"{self.host(name).address}:{DEFAULT_PORT}"

    def _write_cli_config(self) -> None:
        """A CA for this testbed, an agent certificate per host, an operator certificate."""
        self.ca = CertificateAuthority(self.work / "ca")
        self.ca.init(f"godwit testbed {self.prefix}")
        for name in self.names:
            self.ca.issue_agent(name, [self.host(name).address])
        self.ca.issue_client("operator")
        operator = self.ca.bundle_for("operator")
        tls = {key: str(getattr(operator, key)) for key in ("ca", "cert", "key", "crl")}
        hosts = {name: self.address(name) for name in self.names}
        self.config_path.write_text(json.dumps({"hosts": hosts, "tls": tls}))
        self.operator_tls = operator

    def start_agent(self, name: str, *extra_args: str,
                    env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start (or restart) the agent of a host inside its network namespace; `extra_args`
        (e.g. another `--runc`) come after the testbed's own agent arguments, `env` is added
        to its environment (e.g. a godwit.faults point)."""
        host = self.host(name)
        host.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_policy(host)
        log = open(host.state_dir / "agent.log", "ab")  # noqa: SIM115 - owned by the process
        files = self.ca.bundle_for(name)
        argv = [sys.executable, "-m", "godwit", "agent", "--listen", self.address(name),
                "--state-dir", str(host.state_dir), "--runc-root", str(host.runc_root),
                "--name", name, "--tls-ca", str(files.ca), "--tls-cert", str(files.cert),
                "--tls-key", str(files.key), "--tls-crl", str(files.crl),
                "--netns-id", host.netns, "--container-bridge", str(host.bridge),
                *self.agent_args, *extra_args]
        proc = self.net.run_in(host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               env={**os.environ, **(env or {})})
        self.agents[name] = proc
        self._wait_ready(name, proc)
        return proc

    def _write_policy(self, host: TestHost) -> None:
        """The lab's admission policy (godwit.admission): bundles under the testbed's work
        dir and the rootfs cache, bind mounts from there and the temporary dir, the lab's
        capabilities and devices; every host's address is reserved."""
        cache = os.environ.get("GODWIT_CACHE", "/var/cache/godwit")
        policy = {"storage_roots": [str(self.work), cache],
                  "bind_roots": [str(self.work), tempfile.gettempdir()],
                  "capabilities": LAB_CAPABILITIES, "devices": LAB_DEVICES,
                  "reserved_addresses": [h.address for h in self.net.hosts.values()]}
        policy |= self.policy_extra
        # atomically: agents and `godwit run` read it while tests beside widen it
        atomic_write(host.state_dir / "policy.json", json.dumps(policy), mode=0o644)

    def widen_policy(self, **keys: object) -> None:
        """Replace keys of every host's admission policy (e.g. ``capabilities`` for a
        privileged workload); agents read it at the next check, no restart needed."""
        self.policy_extra |= keys
        for name in self.agents:
            self._write_policy(self.host(name))

    def _wait_ready(self, name: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        context = client_context(self.operator_tls)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"agent {name} exited: {self.agent_log(name)[-500:]}")
            try:
                url = f"https://{self.address(name)}/v1/info"
                urllib.request.urlopen(url, timeout=1, context=context)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"agent {name} did not start in {AGENT_START_TIMEOUT_S} s")

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.agents.pop(name, None)
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def agent_log(self, name: str) -> str:
        path = self.host(name).state_dir / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def godwit(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run the CLI against this testbed; output captured as text."""
        env = {**os.environ, "GODWIT_CONFIG": str(self.config_path), "COLUMNS": "120"}
        return subprocess.run([sys.executable, "-m", "godwit", *args], env=env, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def bundle_dir(self, name: str) -> Path:
        return self.work / "bundles" / name
