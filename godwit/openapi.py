"""The OpenAPI 3.1 document of an agent's API, generated from godwit.protocol's routes and
types (served at `GET /v1/openapi.json`)."""

from __future__ import annotations

import functools
import re
from typing import Any

import msgspec

from godwit import __version__
from godwit.protocol import PROTOCOL_VERSION, ROUTES, ErrorReply, Route

REF = "#/components/schemas/{name}"
NDJSON = "application/x-ndjson"
PATH_PARAMETERS = {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "id": {"type": "string", "pattern": "^[0-9a-f-]{1,64}$"},
    "what": {"type": "string", "pattern": "^(rootfs|images|pre-[1-9])$"},
}


@functools.cache
def document() -> dict[str, Any]:
    """The whole document (built once: the routes and types do not change at run time)."""
    kinds = [ErrorReply, *(r.reply for r in ROUTES if r.reply not in (None, dict)),
             *(r.body for r in ROUTES if r.body is not None and not isinstance(r.body, str))]
    refs, components = msgspec.json.schema_components(kinds, ref_template=REF)
    schema_of = dict(zip(map(_key, kinds), refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schema_of)
    return msgspec.json.decode(msgspec.json.encode({  # JSON values: a tuple default is a list
        "openapi": "3.1.0",
        "info": {"title": "godwit agent", "version": PROTOCOL_VERSION,
                 "description": f"godwit {__version__}: live migration of runC containers. "
                                "Every connection is mutual TLS with a certificate of the "
                                "godwit CA; /v1/incoming is for agent certificates only."},
        "security": [{"mutualTLS": []}],
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"mutualTLS": {"type": "mutualTLS"}}},
    }))


def _key(kind: Any) -> str:
    return repr(kind)


def _operation(route: Route, schema_of: dict[str, Any]) -> dict[str, Any]:
    reply = {"type": "object"} if route.reply is dict else schema_of[_key(route.reply)]
    media = NDJSON if route.stream else "application/json"
    operation: dict[str, Any] = {
        "operationId": route.handler,
        "summary": route.summary,
        "responses": {
            str(route.status): {"description": route.summary,
                                "content": {media: {"schema": reply}}},
            "default": {"description": "refused or failed: one line",
                        "content": {"application/json": {"schema": schema_of[_key(ErrorReply)]}}},
        },
    }
    if parameters := [_path_parameter(n) for n in re.findall(r"{(\w+)}", route.path)]:
        operation["parameters"] = parameters
    if isinstance(route.body, str):
        operation["requestBody"] = {"required": True, "content": {
            route.body: {"schema": {"type": "string", "contentMediaType": route.body}}}}
    elif route.body is not None:
        operation["requestBody"] = {"required": not route.optional_body, "content": {
            "application/json": {"schema": schema_of[_key(route.body)]}}}
    return operation


def _path_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": PATH_PARAMETERS[name]}
