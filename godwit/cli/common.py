"""Shared pieces of the CLI commands: config, TLS, agent clients, output."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from godwit.api import AgentClient
from godwit.config import CliConfig
from godwit.errors import GodwitError, NotFound
from godwit.protocol import Event, to_json
from godwit.tls import TLSFiles, client_context

T = TypeVar("T")
console = Console()
err_console = Console(stderr=True)

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


class Context:
    """Per-invocation state: the config is read once, lazily."""

    def __init__(self, config_path: str | None) -> None:
        self._path = Path(config_path) if config_path else None
        self._config: CliConfig | None = None

    @property
    def config(self) -> CliConfig:
        if self._config is None:
            self._config = CliConfig.load(self._path)
        return self._config

    def tls_files(self) -> TLSFiles | None:
        """The operator's TLS files from the config (None: no TLS configured)."""
        tls = self.config.tls
        if not tls:
            return None
        missing = [tls[k] for k in ("ca", "cert", "key") if not Path(tls.get(k, "")).is_file()]
        if missing:
            raise GodwitError(f"TLS file(s) in {self.config.path} not found: "
                              f"{', '.join(missing)}")
        crl = tls.get("crl")
        return TLSFiles(Path(tls["ca"]), Path(tls["cert"]), Path(tls["key"]),
                        Path(crl) if crl else None)

    def ssl_context(self) -> ssl.SSLContext | None:
        files = self.tls_files()
        return client_context(files) if files else None

    def client(self, host: str, timeout: float = 30) -> AgentClient:
        return AgentClient(self.config.address(host), self.ssl_context(), timeout=timeout)

    def host_names(self) -> list[str]:
        if not self.config.hosts:
            raise GodwitError("no hosts configured: add one with `godwit hosts add NAME ADDR`")
        return list(self.config.hosts)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


async def gather_hosts(ctx: Context, hosts: list[str],
                       call: Callable[[AgentClient], Awaitable[T]]) -> dict[str, T | GodwitError]:
    """Ask every host the same question at once; failures come back as errors."""

    async def ask(host: str) -> T | GodwitError:
        try:
            async with ctx.client(host, timeout=10) as agent:
                return await call(agent)
        except GodwitError as exc:
            return exc

    results = await asyncio.gather(*(ask(h) for h in hosts))
    return dict(zip(hosts, results, strict=True))


async def plain_events(events: AsyncIterator[Event]) -> AsyncIterator[dict]:
    """A migration's events as plain JSON values, for printing."""
    async for event in events:
        yield to_json(event)


async def plain_history(agent: AgentClient) -> list[dict]:
    """An agent's migration reports as plain JSON values, for printing and plotting."""
    return [to_json(report) for report in await agent.history()]


async def locate(ctx: Context, name: str) -> str:
    """The configured host that runs a container."""
    found = await gather_hosts(ctx, ctx.host_names(), lambda a: a.container(name))
    hosts = [h for h, r in found.items() if not isinstance(r, GodwitError)]
    if len(hosts) > 1:
        raise GodwitError(f"container {name} exists on several hosts: {', '.join(hosts)}")
    if not hosts:
        down = [h for h, r in found.items() if not isinstance(r, NotFound)]
        hint = f" (unreachable: {', '.join(down)})" if down else ""
        raise NotFound(f"container {name} not found on any host{hint}")
    return hosts[0]
