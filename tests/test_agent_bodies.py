"""Every JSON body route of a real agent application (no TLS, nothing started) refuses a
body that is not its message with a 400 of one line, before it looks at anything else."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from godwit.agent import Agent
from godwit.protocol import ROUTES, Route

PATH_VALUES = {"name": "nobody", "id": "0123-abcd", "what": "rootfs"}
JSON_ROUTES = [r for r in ROUTES if isinstance(r.body, type)]


def ask(tmp_path: Path, route: Route, body: bytes | None) -> tuple[int, dict]:
    path = re.sub(r"{(\w+)}", lambda m: PATH_VALUES[m.group(1)], route.path)

    async def go() -> tuple[int, dict]:
        agent = Agent("h", tmp_path / "state", tmp_path / "runc")
        async with TestClient(TestServer(agent.app())) as client:
            reply = await client.request(route.method, path, data=body)
            return reply.status, await reply.json()

    return asyncio.run(go())


@pytest.mark.parametrize("route", JSON_ROUTES, ids=lambda r: r.handler)
@pytest.mark.parametrize(("body", "error"), [
    (b"[]", "invalid request body: Expected `object`, got `array`"),
    (b'{"no such field": 1}', "invalid request body: "),
    (b"{", "request body is not valid JSON"),
])
def test_a_body_that_is_not_the_message_is_a_400_of_one_line(
        tmp_path: Path, route: Route, body: bytes, error: str) -> None:
    status, reply = ask(tmp_path, route, body)
    assert status == 400, reply
    assert reply["error"].startswith(error) and "\n" not in reply["error"], reply


@pytest.mark.parametrize("route", [r for r in JSON_ROUTES if not r.optional_body],
                         ids=lambda r: r.handler)
def test_a_missing_body_is_refused(tmp_path: Path, route: Route) -> None:
    status, reply = ask(tmp_path, route, None)
    assert status == 400 and "not valid JSON" in reply["error"], reply
