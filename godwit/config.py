"""The operator's configuration: known hosts and the TLS files the CLI presents."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from godwit.api import normalize_address
from godwit.errors import GodwitError, NotFound


def default_path() -> Path:
    env = os.environ.get("GODWIT_CONFIG")
    return Path(env) if env else Path.home() / ".config" / "godwit" / "config.json"


@dataclass
class CliConfig:
    """`{"hosts": {"name": "addr:port"}, "tls": {"ca", "cert", "key", "crl"} | null,
    "etcd": "https://addr:port,…" | null}` (with etcd, cluster mode: hosts come from etcd)."""

    path: Path
    hosts: dict[str, str] = field(default_factory=dict)
    tls: dict[str, str] | None = None
    etcd: str | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> CliConfig:
        path = path or default_path()
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise GodwitError(f"config {path} is not valid JSON") from exc
        return cls(path, dict(raw.get("hosts", {})), raw.get("tls"), raw.get("etcd"))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"hosts": self.hosts, "tls": self.tls, "etcd": self.etcd}
        self.path.write_text(json.dumps(data, indent=1))

    def add_host(self, name: str, address: str) -> None:
        self.hosts[name] = normalize_address(address)

    def remove_host(self, name: str) -> None:
        if self.hosts.pop(name, None) is None:
            raise NotFound(f"no host named {name}")

    def address(self, host: str) -> str:
        """A host name from the config, or an address as given."""
        return self.hosts.get(host) or normalize_address(host)

    def name_of(self, address: str) -> str:
        for name, addr in self.hosts.items():
            if addr == address:
                return name
        return address
