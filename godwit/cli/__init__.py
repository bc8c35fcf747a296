"""The `godwit` command line."""

from __future__ import annotations

import sys

import click

from godwit.cli.common import Context
from godwit.errors import GodwitError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="GODWIT_CONFIG", help="CLI config file (hosts, TLS).")
@click.version_option(package_name="godwit")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Live migration of running runC containers between hosts."""
    ctx.obj = Context(config_path)


def _register() -> None:
    from godwit.cli import adopt, agent, containers, demo, evacuate, hosts
    from godwit.cli.ca import ca

    for command in (*containers.COMMANDS, *adopt.COMMANDS, *hosts.COMMANDS, agent.agent,
                    demo.demo, ca, evacuate.evacuate_cmd):
        cli.add_command(command)


_register()


def main() -> None:
    """Entry point: one-line errors, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except GodwitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
