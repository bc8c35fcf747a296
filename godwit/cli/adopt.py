"""`godwit adopt` and `godwit release`: runc containers godwit did not start."""

from __future__ import annotations

import click

from godwit.cli.common import Context, console, emit_json, json_option, run
from godwit.cli.containers import on_container
from godwit.protocol import ContainerInfo, to_json

pass_ctx = click.make_pass_decorator(Context)
runc_root_option = click.option(
    "--runc-root", type=click.Path(file_okay=False),
    help="runc's --root of the container outside godwit [default: /run/runc].")
id_option = click.option("--id", "runc_id", help="Its id under that root [default: NAME].")


@click.command("adopt")
@click.argument("name")
@click.option("--host", "-H", required=True, help="The host it runs on.")
@runc_root_option
@id_option
@json_option
@pass_ctx
def adopt_cmd(ctx: Context, name: str, host: str, runc_root: str | None,
              runc_id: str | None, as_json: bool) -> None:
    """Take a running runc container godwit did not start under the agent of HOST, as
    NAME, without restarting it: `godwit migrate` then moves it. Refused (container
    untouched) when CRIU could not move it: terminal, stdio a host file, the host's
    network namespace, or a device linked outside its own (a veth to a host bridge)."""

    async def go() -> ContainerInfo:
        async with ctx.client(host) as agent:
            return await agent.adopt(name, runc_root, runc_id)

    result = run(go())
    if as_json:
        emit_json(to_json(result))
    else:
        console.print(f"{name} adopted on {result.host} (pid {result.pid})",
                      markup=False, soft_wrap=True)


@click.command("release")
@click.argument("name")
@click.option("--host", "-H", help="Host name from the config, or ADDR:PORT.")
@runc_root_option
@id_option
@json_option
@pass_ctx
def release_cmd(ctx: Context, name: str, host: str | None, runc_root: str | None,
                runc_id: str | None, as_json: bool) -> None:
    """Give container NAME back to plain runc on the host it runs on: it keeps running,
    `runc --root DIR list` shows it, godwit forgets it."""
    result = on_container(ctx, name, host,
                          lambda agent: agent.release(name, runc_root, runc_id))
    if as_json:
        emit_json(to_json(result))
    else:
        console.print(f"{name} released on {result.host}: runc --root {result.runc_root} "
                      f"state {result.id} (bundle {result.bundle})",
                      markup=False, soft_wrap=True)


COMMANDS = (adopt_cmd, release_cmd)
