"""The wire contract of godwit: every JSON body between the CLI and an agent and between
agents, the routes that carry them, the protocol version, and the OpenAPI 3.1 document.

The types are msgspec Structs (msgspec 0.23, pinned). Why msgspec and not dataclasses or
pydantic:
- untrusted input: `decode` checks a peer's body against its type in one pass (types,
  lengths, patterns, no unknown field in a request) and says what is wrong in one line
  with its place (``Expected `str`, got `int` - at `$.argv[0]```); hand-written checks
  of dicts (what dataclasses would need) miss fields and drift from the docs;
- OpenAPI 3.1: `msgspec.json.schema_components` writes JSON Schema 2020-12 components,
  the dialect of OpenAPI 3.1, tagged unions with a discriminator included;
- speed: decoding and encoding go straight between bytes and objects (an incoming
  request decodes and validates in ~6 µs here, faster than `json.loads` alone, ~13 µs, or
  pydantic, ~13 µs), and importing it and defining a type takes ~19 ms against ~90 ms for
  pydantic 2.14 (every CLI command pays it);
- one small wheel without dependencies, pinned exactly in pyproject.toml.

Requests refuse unknown fields (a misspelt option is an error, not silently ignored);
replies ignore them, so that a newer agent of the same major version may add fields. A
peer that speaks another major `PROTOCOL_VERSION` is refused by pre-flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec

from godwit.criu import CriuCapabilities
from godwit.errors import GodwitError
from godwit.image_config import Overrides
from godwit.migration import MigrationOptions
from godwit.migration.states import DestinationState, Result
from godwit.network import ContainerNet
from godwit.preflight import Finding
from godwit.runc_features import RuncFeatures

# major.minor: a new major is not understood by an older agent. 2.0: a prepare request
# announces `upload_bytes` (the destination bounds the uploads by it); the pre-flight asks
# the destination's admission (`POST /v1/preflight/admission`). 2.1: stop-and-copy streams
# pages to a CRIU page server on the destination. 2.2: a tree stream carries ``sock``
# records (bound unix socket names); a 2.1 destination refuses them and the migration
# rolls back. 2.3: a stop-and-copy destination restores lazily and fills the memory from
# the pages it received, after the restore (`ArmRequest.fill_after_restore`). 2.4: the
# source waits for the restored memory with `GET /v1/incoming/{id}/pages`, answered once the
# fill is complete or failed, or after PAGES_WAIT_S (it polled the migration's state before).
# 2.5: a post-copy source names its page server at arm (`ArmRequest.lazy_page_server`), so
# that the destination starts the lazy-pages daemon then, not in the freeze. 2.6: the source
# sends the dump's images as the body of the restore (`POST /v1/incoming/{id}/restore-images`):
# one round trip less in the freeze; a post-copy restore pulls from the arm's page server.
# 2.7: a source whose dump's images are small (post-copy without shared memory) asks for
# them to be kept in memory (`ArmRequest.images_in_memory`: a tmpfs on the staging's images).
# 2.8: a tree stream's file digests may be BLAKE3 (its header's flag bit 1); a source sends
# sha256 to an older destination, which refuses the flag. 2.9: a tree stream's records carry
# the entries' extended attributes (`xattrs`: user.*, trusted.*, security.*, POSIX ACLs); an
# older destination ignores the field, and its copy has none, as before.
PROTOCOL_VERSION = "2.9"
PAGES_WAIT_S = 5.0
MigrationId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f-]{1,64}$", max_length=64)]
M = TypeVar("M")


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: unknown fields are refused."""


class Reply(msgspec.Struct, kw_only=True):
    """A reply body: unknown fields (from a newer agent) are ignored."""


class ErrorReply(Reply, kw_only=True):
    """Every 4xx/5xx answer."""

    error: str


# host
class QosClass(Reply, kw_only=True):
    classid: str
    rate_mbit: float
    ceil_mbit: float
    bytes: int
    packets: int
    drops: int


class QosState(Reply, kw_only=True):
    ifname: str
    netns: str | None = None
    active: bool
    classes: dict[str, QosClass] = {}


class TlsExpiry(Reply, kw_only=True):
    """Whole days before the agent's certificate expires and its CRL goes stale (None:
    unreadable, or no CRL); since protocol 1.1."""

    certificate_days_left: int | None = None
    crl_days_left: int | None = None


class HostInfo(Reply, kw_only=True):
    """`GET /v1/info`: what pre-flight and strategy choice need to know about a host."""

    name: str
    godwit: str
    protocol: str = "0.0"  # an agent older than the protocol version reports none
    runc: str
    runc_features: RuncFeatures | None = None
    criu: CriuCapabilities | None = None
    time: float
    containers: int
    mem_available: int
    disk_free: int
    qos: QosState | None = None
    tls: TlsExpiry | None = None  # since 1.1


class ClockSample(Reply, kw_only=True):
    """`GET /v1/time`: the agent's clock when the request arrived and when it answered."""

    received: float
    sent: float


# containers
class RunRequest(Request, kw_only=True):
    """`POST /v1/containers`: from a bundle directory on the agent's host, or an image."""

    name: str
    bundle: str | None = None
    image: str | None = None
    overrides: Overrides | None = None
    net: ContainerNet | None = None


class ContainerInfo(Reply, kw_only=True):
    """One container: godwit's record (containers.ContainerRecord) and runc's state."""

    name: str
    rootfs: str
    rootfs_owned: bool
    created_at: float
    origin: str | None = None
    net: ContainerNet | None = None
    private_netns: bool = False
    image: str | None = None
    image_digest: str | None = None
    exposed_ports: list[str] | None = None
    adopted: dict[str, str] | None = None  # godwit.adopt: runc root, id, cgroup before
    host: str
    memory: int
    status: str
    pid: int


class ExecRequest(Request, kw_only=True):
    argv: Annotated[list[str], msgspec.Meta(min_length=1, max_length=4096)]


class ExecResult(Reply, kw_only=True):
    exit_code: int
    stdout: str
    stderr: str


class SignalRequest(Request, kw_only=True):
    signal: Annotated[str, msgspec.Meta(min_length=1, max_length=16)] = "TERM"


class Signalled(Reply, kw_only=True):
    signalled: str
    signal: str


class Removed(Reply, kw_only=True):
    removed: str


class AdoptRequest(Request, kw_only=True):
    """`adopt` and `release`: where the container is (or goes) outside godwit (defaults:
    /run/runc, its godwit name)."""

    runc_root: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    id: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class Released(Reply, kw_only=True):
    name: str
    host: str
    runc_root: str
    id: str
    bundle: str


# migrations, source side
class PhaseEvent(Reply, kw_only=True, tag_field="event", tag="phase"):
    at: float
    name: str
    state: str  # start | end
    seconds: float | None = None


class ProgressEvent(Reply, kw_only=True, tag_field="event", tag="progress"):
    at: float
    name: str
    done: int
    total: int


class LogEvent(Reply, kw_only=True, tag_field="event", tag="log"):
    at: float
    message: str


class PhaseRecord(Reply, kw_only=True):
    name: str
    started: float
    ended: float | None = None
    seconds: float


class Report(Reply, kw_only=True):
    """A migration's report (migration.report.MigrationReport, with its durations)."""

    id: str
    container: str
    source: str
    destination: str
    strategy: str
    started_at: float
    finished_at: float | None = None
    result: Result
    error: str | None = None
    outcome: str = ""
    frozen_at: float | None = None
    resumed_at: float | None = None
    downtime_s: float | None = None
    max_freeze_s: float | None = None
    image_bytes: int = 0
    rootfs_bytes: int = 0
    wire_bytes: int = 0
    held_packets: int = 0
    pages: str | None = None
    image: str | None = None
    image_digest: str | None = None
    options: dict[str, Any] = {}
    preflight: list[Finding] = []
    phases: list[PhaseRecord] = []
    total_s: float


class ResultEvent(Reply, kw_only=True, tag_field="event", tag="result"):
    at: float
    report: Report


Event = PhaseEvent | ProgressEvent | LogEvent | ResultEvent  # one NDJSON line of a migrate


class KeptLog(Reply, kw_only=True):
    name: str
    size: int
    text: str


class MigrationLogs(Reply, kw_only=True):
    """`GET /v1/migrations/{id}/logs`: CRIU/runc logs this host kept of a failed one."""

    host: str
    logs: list[KeptLog]


class PreflightRequest(Request, kw_only=True):
    to: str
    strategy: str = "auto"
    container: str | None = None


class PreflightReply(Reply, kw_only=True):
    source: str
    destination: str | None = None
    findings: list[Finding]


# migrations, destination side
class IncomingRequest(Request, kw_only=True):
    """`POST /v1/incoming`: the source asks the destination to prepare for a container."""

    id: MigrationId
    name: str
    source: str
    config: dict[str, Any]  # the container's OCI config.json
    shared_rootfs: str | None = None
    commit_timeout: Annotated[float, msgspec.Meta(gt=0)]
    idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    strategy: str
    net: ContainerNet | None = None
    private_netns: bool = False
    # what the source expects to upload (rootfs and images, the pre-flight's disk estimate):
    # the destination refuses it beyond its free disk, and cuts uploads past it (margin in
    # godwit.migration.receiver)
    upload_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**62)]

    @property
    def owns_netns(self) -> bool:
        """The incoming container gets a godwit netns here (with or without an address)."""
        return self.net is not None or self.private_netns


class Prepared(Reply, kw_only=True):
    id: str
    staging: str


class Uploaded(Reply, kw_only=True):
    files: int
    bytes: int
    wire_bytes: int
    seconds: float


class ArmRequest(Request, kw_only=True, omit_defaults=True):
    descriptors: Annotated[list[str], msgspec.Meta(max_length=16)]
    stream_pages: bool = False  # 2.1: run a CRIU page server for the dump's memory pages
    # 2.3: restore lazily, the memory filled from the received pages after the restore
    fill_after_restore: bool = False
    # 2.5: post-copy: the source's page server the restored memory will come from
    lazy_page_server: str | None = None
    # 2.7: the images are small: keep them on a tmpfs (no file creation on disk in the freeze)
    images_in_memory: bool = False


class Armed(Reply, kw_only=True):
    armed: str
    page_server: str | None = None  # 2.1: address:port of that page server


class Activated(Reply, kw_only=True):
    activated: str


class RestoreRequest(Request, kw_only=True):
    page_server: str | None = None  # post-copy: where the destination pulls pages from


class Restored(Reply, kw_only=True):
    restored_at: float
    held_packets: int
    pid: int
    page_bytes: int = 0  # 2.1: memory pages a streamed dump sent to the page server


class IncomingState(Reply, kw_only=True):
    """Where a migration stands on the destination; post-copy adds how its memory pages
    arrive. A state this agent does not know makes the reply unreadable: the source
    takes it as no answer."""

    state: DestinationState
    pages: str | None = None


class Forgotten(Reply, kw_only=True):
    forgotten: str


# codec
_encoder = msgspec.json.Encoder()


def encode(message: object) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[M], what: str = "request body") -> M:
    """`data` as a `kind`; a body that does not fit is a GodwitError of one line."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise GodwitError(f"invalid {what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise GodwitError(f"{what} is not valid JSON: {exc}") from exc


def convert(data: object, kind: type[M], what: str = "message") -> M:
    """Already parsed JSON (a journal, a saved report) as a `kind`."""
    try:
        return msgspec.convert(data, type=kind)
    except msgspec.ValidationError as exc:
        raise GodwitError(f"invalid {what}: {exc}") from exc


def to_json(message: object) -> Any:
    """Plain JSON values (dicts, lists) of a message, for printing and plotting."""
    return msgspec.to_builtins(message)


# routes
@dataclass(frozen=True)
class Route:
    """One endpoint: `handler` is the name of the Agent method that serves it."""

    method: str
    path: str
    handler: str
    summary: str
    reply: Any = None  # None: no JSON reply
    body: Any = None  # a Request type, or a media type of a raw body
    stream: bool = False  # the reply is NDJSON lines of `reply`
    status: int = 200
    optional_body: bool = False  # no body stands for `body()` (every field has a default)


OCTET = "application/octet-stream"
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/info", "info", "host facts: versions, CRIU features, resources",
          HostInfo),
    Route("GET", "/v1/openapi.json", "openapi", "this document", dict),
    Route("GET", "/v1/containers", "list_containers", "containers of this host",
          list[ContainerInfo]),
    Route("POST", "/v1/containers", "run_container",
          "start a container from a bundle dir or an image", ContainerInfo, RunRequest,
          status=201),
    Route("GET", "/v1/containers/{name}", "get_container", "one container", ContainerInfo),
    Route("DELETE", "/v1/containers/{name}", "remove_container", "kill and remove", Removed),
    Route("POST", "/v1/containers/{name}/exec", "exec_container",
          "run a command in the container", ExecResult, ExecRequest),
    Route("POST", "/v1/containers/{name}/signal", "signal_container",
          "signal the container's init", Signalled, SignalRequest),
    Route("POST", "/v1/containers/{name}/resume", "resume_container",
          "resume a paused copy (after an in-doubt migration)", ContainerInfo),
    Route("POST", "/v1/containers/{name}/adopt", "adopt_container",
          "take a running runc container godwit did not start under this agent",
          ContainerInfo, AdoptRequest, status=201, optional_body=True),
    Route("POST", "/v1/containers/{name}/release", "release_container",
          "give a container back to plain runc (it keeps running)", Released, AdoptRequest,
          optional_body=True),
    Route("POST", "/v1/containers/{name}/migrate", "migrate",
          "migrate to another host; NDJSON events, the last a result", Event,
          MigrationOptions, stream=True),
    Route("GET", "/v1/time", "clock", "clock samples for skew checks", ClockSample),
    Route("POST", "/v1/preflight", "preflight", "pre-flight checks towards another host",
          PreflightReply, PreflightRequest),
    Route("POST", "/v1/preflight/cpuinfo", "check_cpuinfo",
          "can this CPU run a `criu cpuinfo dump` image's processes", Finding, OCTET),
    Route("POST", "/v1/preflight/admission", "check_admission",
          "would this host admit the migration (its policy, its free disk); nothing staged",
          Finding, IncomingRequest),
    Route("GET", "/v1/migrations", "history", "reports of past migrations", list[Report]),
    Route("GET", "/v1/migrations/{id}", "report", "one report", Report),
    Route("GET", "/v1/migrations/{id}/logs", "migration_logs",
          "CRIU/runc logs kept of a failed migration", MigrationLogs),
    Route("POST", "/v1/incoming", "prepare_incoming", "prepare to receive a container",
          Prepared, IncomingRequest),
    Route("PUT", "/v1/incoming/{id}/{what}", "upload_incoming",
          "rootfs, images or pre-1 … pre-9 as a godwit tree stream (transport)", Uploaded,
          OCTET),
    Route("POST", "/v1/incoming/{id}/arm", "arm_incoming",
          "place rootfs and bundle, start runc restore held before CRIU", Armed, ArmRequest),
    Route("POST", "/v1/incoming/{id}/activate", "activate_incoming",
          "source frozen: take over the container's address", Activated),
    Route("POST", "/v1/incoming/{id}/restore", "restore_incoming", "restore the container",
          Restored, RestoreRequest, optional_body=True),
    Route("POST", "/v1/incoming/{id}/restore-images", "restore_with_images",
          "receive the dump's images as a godwit tree stream, then restore the container",
          Restored, OCTET),
    Route("POST", "/v1/incoming/{id}/commit", "commit_incoming",
          "the destination keeps the container", IncomingState),
    Route("POST", "/v1/incoming/{id}/forget", "forget_incoming",
          "the source settled it: drop the ended record", Forgotten),
    Route("GET", "/v1/incoming/{id}", "incoming_state", "how the migration stands here",
          IncomingState),
    Route("GET", "/v1/incoming/{id}/pages", "incoming_pages",
          "how the migration stands once the restored memory is complete or failed "
          "(at most PAGES_WAIT_S later)", IncomingState),
    Route("DELETE", "/v1/incoming/{id}", "abort_incoming",
          "abort: kill a restored copy, drop staged files", IncomingState),
)


def message_types() -> list[type]:
    """Every Struct of this module (the wire-contract test round-trips each)."""
    return [kind for kind in globals().values()
            if isinstance(kind, type) and issubclass(kind, msgspec.Struct)
            and kind not in (Request, Reply)] + [MigrationOptions]
