"""Fuzzing a real agent's API (real TLS, a real container) from its own OpenAPI document.

What is sent, and why: a request that the agent *accepts* on some routes starts real
things (a container, a migration, a staging area, a command inside a container, a
connection to another host). So:
- valid requests (schemathesis' positive mode) go only to routes that read, or that act on
  a path parameter naming nothing here (random container names, random migration ids: the
  agent must refuse them before touching anything);
- invalid requests (negative mode) go to every route; on the routes with a body the
  container name is the real one, and on the acting routes a case whose body happens to
  be valid is not sent (an invalid name alone must be refused too, but not on the real
  container: `DELETE /v1/containers/fuzzed` is a valid request).
Then: no answer is a 5xx, the agent logged no traceback, and nothing changed on the host
(containers, incoming and outgoing migrations, reports).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import hypothesis
import pytest
import requests
import requests.adapters
import schemathesis
from conftest import cli_json
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from godwit.errors import GodwitError
from godwit.lab.bundles import counter_bundle
from godwit.lab.testbed import Testbed
from godwit.protocol import ROUTES, Route, decode
from godwit.tls import TLSFiles, client_context

pytestmark = pytest.mark.integration
NAME = "fuzzed"
BUDGET_S = 120.0
EXAMPLES = 25  # per route and mode


def acting(route: Route) -> bool:
    """Every route but a read may start, change or remove something: a valid request to
    it is never sent (a new route is covered without being listed)."""
    return route.method not in ("GET", "HEAD")


@pytest.fixture(scope="module")
def target(bed: Testbed) -> Iterator[Testbed]:
    result = bed.godwit("run", NAME, "--bundle", str(counter_bundle(bed.bundle_dir(NAME))),
                        "--host", "a")
    assert result.returncode == 0, result.stderr
    yield bed
    bed.godwit("rm", NAME)


class GodwitTLS(requests.adapters.HTTPAdapter):
    """requests over godwit's own TLS context (its CA, a certificate, its CRL)."""

    def __init__(self, files: TLSFiles) -> None:
        self.context = client_context(files)
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs, ssl_context=self.context)


def session_of(files: TLSFiles) -> requests.Session:
    session = requests.Session()
    session.mount("https://", GodwitTLS(files))
    return session


def host_state(bed: Testbed) -> dict:
    """Everything a refused request must leave as it was."""
    state_dir = bed.host("a").state_dir
    rows = cli_json(bed, "ps")["containers"]
    return {
        "containers": sorted((r["host"], r["name"], r["status"], r["pid"]) for r in rows),
        "incoming": sorted(p.name for p in (state_dir / "incoming").glob("*")),
        "outgoing": sorted(p.name for p in (state_dir / "outgoing").glob("*")),
        "reports": sorted(p.name for p in (state_dir / "reports").glob("*")),
    }


def route_of(operation) -> Route:
    return next(r for r in ROUTES if r.handler == operation.definition.raw["operationId"])


def valid_body(route: Route, case) -> bool:
    """Would the agent accept this case's body (as it decodes it)?"""
    if not isinstance(route.body, type):
        return False
    try:
        decode(json.dumps(case.body).encode() if is_json(case.body) else b"", route.body)
    except GodwitError:
        return False
    return True


def is_json(body: object) -> bool:
    return body is None or isinstance(body, dict | list | str | int | float | bool)


class Fuzzer:
    """Sends generated cases to a real agent within a time budget."""

    def __init__(self, operator: requests.Session, agent: requests.Session, base: str,
                 budget_s: float) -> None:
        self.operator, self.agent, self.base = operator, agent, base
        self.deadline = time.monotonic() + budget_s
        self.sent = 0

    def run(self, schema, mode: schemathesis.GenerationMode) -> None:
        for result in schema.get_all_operations():
            operation = result.ok()
            route = route_of(operation)
            positive = mode is schemathesis.GenerationMode.POSITIVE
            if positive and acting(route):
                continue
            if not positive and route.body is None and "{" not in route.path:
                continue  # nothing of the request can be made invalid
            self.route_cases(operation, route, mode)

    def route_cases(self, operation, route: Route, mode: schemathesis.GenerationMode) -> None:
        checks = [not_a_server_error]
        if mode is schemathesis.GenerationMode.POSITIVE:
            checks.append(response_schema_conformance)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        def one(case) -> None:
            if isinstance(route.body, type) and "name" in (case.path_parameters or {}):
                case.path_parameters["name"] = NAME  # its body must protect the container
            if acting(route) and valid_body(route, case):
                return  # accepted, it would start something
            if time.monotonic() > self.deadline:
                return
            session = self.agent if route.path.startswith("/v1/incoming") else self.operator
            response = case.call(base_url=self.base, session=session, timeout=30)
            self.sent += 1
            case.validate_response(response, checks=checks)

        one()


def test_fuzzed_requests_are_refused_cleanly_and_change_nothing(target: Testbed) -> None:
    bed = target
    # each route with a role allowed on it (godwit.authz): /v1/incoming is for agents only
    operator, agent = session_of(bed.operator_tls), session_of(bed.ca.bundle_for("b"))
    base = f"https://{bed.address('a')}"
    document = operator.get(f"{base}/v1/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document)
    log_before = len(bed.agent_log("a"))
    before = host_state(bed)
    started = time.monotonic()
    fuzzer = Fuzzer(operator, agent, base, BUDGET_S)
    fuzzer.run(schema, schemathesis.GenerationMode.NEGATIVE)
    fuzzer.run(schema, schemathesis.GenerationMode.POSITIVE)
    print(f"{fuzzer.sent} requests in {time.monotonic() - started:.1f} s")
    assert fuzzer.sent > 200, f"only {fuzzer.sent} requests sent"
    log = bed.agent_log("a")[log_before:]
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert host_state(bed) == before


def test_openapi_document_is_served_to_an_operator(bed: Testbed) -> None:
    reply = session_of(bed.operator_tls).get(f"https://{bed.address('a')}/v1/openapi.json",
                                             timeout=10)
    assert reply.status_code == 200
    assert reply.json()["openapi"] == "3.1.0"
