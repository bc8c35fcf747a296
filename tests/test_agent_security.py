"""Agents accept only peers holding a certificate of the testbed's CA, per role."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest

from godwit.api import AgentClient
from godwit.errors import GodwitError
from godwit.lab.testbed import Testbed
from godwit.tls import client_context

pytestmark = pytest.mark.integration


def call(bed: Testbed, context: ssl.SSLContext | None, method: str, path: str) -> dict:
    async def go() -> dict:
        async with AgentClient(bed.address("a"), context, timeout=5) as agent:
            return await agent.request(method, path, json={})

    return asyncio.run(go())


def test_operator_certificate_is_accepted(bed: Testbed) -> None:
    info = call(bed, client_context(bed.operator_tls), "GET", "/v1/info")
    assert info["name"] == "a"


def test_client_without_certificate_is_refused(bed: Testbed) -> None:
    context = ssl.create_default_context(cafile=str(bed.operator_tls.ca))
    with pytest.raises(GodwitError):
        call(bed, context, "GET", "/v1/info")


def test_plain_http_is_refused(bed: Testbed) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://{bed.address('a')}/v1/info")

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(go())


def test_operator_cannot_push_a_migration(bed: Testbed) -> None:
    with pytest.raises(GodwitError, match=r"operator certificate .* may not POST"):
        call(bed, client_context(bed.operator_tls), "POST", "/v1/incoming")


def test_revoked_certificate_is_refused_without_restart(bed: Testbed) -> None:
    bed.ca.issue_client("mallory")
    mallory = bed.ca.bundle_for("mallory")
    assert call(bed, client_context(mallory), "GET", "/v1/info")["name"] == "a"
    bed.ca.revoke("mallory")
    with pytest.raises(GodwitError):
        call(bed, client_context(mallory), "GET", "/v1/info")
    assert call(bed, client_context(bed.operator_tls), "GET", "/v1/info")["name"] == "a"


def test_revocation_applies_to_an_open_connection(bed: Testbed) -> None:
    """A keep-alive connection opened before the revocation is refused on its next request."""
    bed.ca.issue_client("eve")
    context = client_context(bed.ca.bundle_for("eve"))

    async def go() -> None:
        async with AgentClient(bed.address("a"), context, timeout=5) as agent:
            assert (await agent.info()).name == "a"
            bed.ca.revoke("eve")
            with pytest.raises(GodwitError, match="revoked"):
                await agent.info()

    asyncio.run(go())
