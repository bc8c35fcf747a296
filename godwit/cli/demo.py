"""`godwit demo`: two hosts on this machine, one live migration."""

from __future__ import annotations

import click


@click.command("demo")
@click.option("--keep", is_flag=True, help="Leave the hosts running afterwards.")
def demo(keep: bool) -> None:
    """Create two network-namespace hosts and live-migrate a counting container."""
    # The only product import of godwit.lab, and lazy: the lab loads when the demo runs
    # (tests/test_layout.py allows exactly this one).
    from godwit.lab.demo import run_demo

    run_demo(keep=keep)
