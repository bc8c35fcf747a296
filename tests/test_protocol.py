"""The wire contract: every message type survives JSON, bad bodies are one-line errors, the
OpenAPI document is valid and describes every route."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest
from openapi_spec_validator import validate

from godwit.authz import RULES
from godwit.containers import ContainerRecord
from godwit.errors import GodwitError
from godwit.migration import MigrationOptions
from godwit.migration.report import EventStream, MigrationReport
from godwit.openapi import document
from godwit.preflight import check_protocol
from godwit.protocol import (
    PROTOCOL_VERSION,
    ROUTES,
    ArmRequest,
    ContainerInfo,
    Event,
    ExecRequest,
    HostInfo,
    IncomingRequest,
    Report,
    ResultEvent,
    SignalRequest,
    decode,
    encode,
    message_types,
)

# values for fields whose type alone does not make a valid one (validated in __post_init__
# or by a pattern)
BY_NAME: dict[str, Any] = {"ip": "10.0.0.5/24", "gateway": "10.0.0.1", "mac": "02:00:0a:00:00:05",
                           "strategy": "post-copy", "id": "0123-abcd", "level": "warn"}


def sample(info: msgspec.inspect.Type, name: str = "") -> Any:
    """A value of a type, every optional field filled (so that none is lost unseen)."""
    if name in BY_NAME and isinstance(info, msgspec.inspect.StrType | msgspec.inspect.LiteralType
                                      | msgspec.inspect.UnionType):
        return BY_NAME[name]
    match info:
        case msgspec.inspect.StructType() | msgspec.inspect.DataclassType():
            return {f.encode_name: sample(f.type, f.name) for f in info.fields} | (
                {info.tag_field: info.tag} if getattr(info, "tag_field", None) else {})
        case msgspec.inspect.UnionType():
            return sample(next(t for t in info.types
                               if not isinstance(t, msgspec.inspect.NoneType)), name)
        case msgspec.inspect.ListType() | msgspec.inspect.VarTupleType():
            return [sample(info.item_type, name)]
        case msgspec.inspect.DictType():
            return {"key": sample(info.value_type)}
        case msgspec.inspect.LiteralType():
            return info.values[-1]
        case msgspec.inspect.EnumType():  # states (godwit.migration.states)
            return list(info.cls)[-1].value
        case msgspec.inspect.StrType():
            return f"{name or 'text'}-value"
        case msgspec.inspect.BoolType():
            return True
        case msgspec.inspect.IntType():
            return 7
        case msgspec.inspect.FloatType():
            return 30.5
        case msgspec.inspect.AnyType():
            return {"any": [1, "two"]}
    raise AssertionError(f"no sample for {info!r}")


@pytest.mark.parametrize("kind", message_types(), ids=lambda k: k.__name__)
def test_every_message_type_round_trips_through_json(kind: type) -> None:
    raw = sample(msgspec.inspect.type_info(kind))
    message = msgspec.convert(raw, kind)
    wire = encode(message)
    again = decode(wire, kind)
    assert again == message
    assert msgspec.json.decode(wire) == raw  # no field lost, renamed or added on the way
    assert encode(again) == wire


def test_the_contract_knows_every_type_its_routes_carry() -> None:
    known = set(message_types())
    carried = {r.reply for r in ROUTES} | {r.body for r in ROUTES}
    structs = {k for k in carried if isinstance(k, type) and issubclass(k, msgspec.Struct)}
    assert structs <= known
    assert {"PhaseEvent", "ProgressEvent", "LogEvent", "ResultEvent"} <= {
        k.__name__ for k in known}


def test_wire_report_has_every_field_of_the_report() -> None:
    fields = {f.name for f in dataclasses.fields(MigrationReport)}
    assert set(Report.__struct_fields__) == fields | {"total_s"}
    report = MigrationReport(id="0-1", container="c", source="a", destination="b",
                             strategy="stop-and-copy")
    events = EventStream(report)
    with events.phase("prepare"):
        events.progress("rootfs", 1, 2)
        events.log("hello")
    events.close()
    lines = []
    while (event := events.queue.get_nowait()) is not None:
        lines.append(decode(encode(event), Event))
    assert [type(e).__name__ for e in lines] == [
        "PhaseEvent", "ProgressEvent", "LogEvent", "PhaseEvent", "ResultEvent"]
    assert isinstance(lines[-1], ResultEvent)
    assert lines[-1].report.phases[0].name == "prepare"


def test_container_info_carries_the_whole_record() -> None:
    record = {f.name for f in dataclasses.fields(ContainerRecord)}
    assert record <= set(ContainerInfo.__struct_fields__)


@pytest.mark.parametrize(("body", "kind", "error"), [
    (b"{}", ExecRequest, "invalid request body: Object missing required field `argv`"),
    (b"{nope", ExecRequest, "request body is not valid JSON"),
    (b"[]", ExecRequest, "Expected `object`, got `array`"),
    (b'{"argv": []}', ExecRequest, "Expected `array` of length >= 1 - at `$.argv`"),
    (b'{"argv": [1]}', ExecRequest, "Expected `str`, got `int` - at `$.argv[0]`"),
    (b'{"argv": ["ls"], "extra": 1}', ExecRequest, "unknown field `extra`"),
    (msgspec.json.encode({"descriptors": ["a"] * 17}), ArmRequest, "length <= 16"),
    (b'{"to": "b", "tcp_established": true}', MigrationOptions,
     "unknown field `tcp_established`"),
    (b'{"to": "b", "strategy": "teleport"}', MigrationOptions, "unknown strategy 'teleport'"),
    (b'{"to": "b", "commit_timeout": 1}', MigrationOptions, "at least 5 seconds"),
    (b'{"id": "../etc", "name": "c", "source": "a", "config": {}, "commit_timeout": 5, '
     b'"strategy": "stop-and-copy"}', IncomingRequest, "at `$.id`"),
])
def test_a_bad_body_is_one_line(body: bytes, kind: type, error: str) -> None:
    with pytest.raises(GodwitError) as caught:
        decode(body, kind)
    assert error in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_empty_body_is_refused_even_when_every_field_has_a_default() -> None:
    with pytest.raises(GodwitError, match="not valid JSON"):
        decode(b"", SignalRequest)  # a POST without body must not send SIGTERM


def test_a_reply_from_a_newer_agent_may_carry_more_fields() -> None:
    info = sample(msgspec.inspect.type_info(HostInfo)) | {"added_in_1_1": True}
    assert decode(msgspec.json.encode(info), HostInfo).name == "name-value"


def test_an_agent_without_a_protocol_version_is_refused() -> None:
    info = sample(msgspec.inspect.type_info(HostInfo))
    del info["protocol"]
    old = decode(msgspec.json.encode(info), HostInfo)
    finding = check_protocol(PROTOCOL_VERSION, old.protocol)
    assert finding.level == "error"
    assert "protocol 0.0" in finding.message
    assert check_protocol("1.0", "1.3").level == "ok"
    assert check_protocol("1.0", "2.0").level == "error"


def test_openapi_document_is_valid_and_lists_every_route() -> None:
    spec = document()
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    assert spec["info"]["version"] == PROTOCOL_VERSION
    for route in ROUTES:
        operation = spec["paths"][route.path][route.method.lower()]
        assert operation["operationId"] == route.handler
        if isinstance(route.body, type):
            assert "requestBody" in operation


def test_every_route_has_its_handler_on_the_agent() -> None:
    from godwit.agent import Agent

    for route in ROUTES:
        assert callable(getattr(Agent, route.handler, None)), route
    assert len({(r.method, r.path) for r in ROUTES}) == len(ROUTES)


def test_an_arm_request_without_streamed_pages_is_what_a_1_0_agent_accepts() -> None:
    """stream_pages is left out unless set, so an older agent (unknown fields refused)
    still takes the arm of a strategy that does not stream."""
    assert msgspec.json.decode(encode(ArmRequest(descriptors=["a"]))) == {"descriptors": ["a"]}
    streamed = msgspec.json.decode(encode(ArmRequest(descriptors=[], stream_pages=True)))
    assert streamed == {"descriptors": [], "stream_pages": True}


def test_every_route_has_its_roles() -> None:
    """A route missing from authz.RULES is refused to everyone: a migration step would fail
    between two agents."""
    assert [f"{r.method} {r.path}" for r in ROUTES if (r.method, r.path) not in RULES] == []
