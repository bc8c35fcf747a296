"""`godwit agent`: run the agent of this host."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import click

from godwit.agent import Agent, default_name, serve
from godwit.api import normalize_address


@click.command("agent")
@click.option("--listen", default="0.0.0.0:7451", show_default=True, help="ADDR:PORT to serve.")
@click.option("--state-dir", default="/var/lib/godwit", show_default=True,
              type=click.Path(file_okay=False), help="Records, staging and reports.")
@click.option("--runc-root", default="/run/godwit/runc", show_default=True,
              type=click.Path(file_okay=False), help="runc --root for this host's containers.")
@click.option("--name", default=None, help="Host name reported to peers [default: hostname].")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def agent(listen: str, state_dir: str, runc_root: str, name: str | None, log_level: str) -> None:
    """Serve this host's containers and accept migrations from peers."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    host_agent = Agent(name or default_name(), state, Path(runc_root))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host_agent, normalize_address(listen)))
