"""The godwit agent: one per host, serving the HTTP/JSON API described in api.py."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from godwit import __version__, adopt, authz, faults, images, procfs
from godwit.admission import Admission
from godwit.api import DEFAULT_PORT
from godwit.audit import AuditLog, audit_middleware
from godwit.authz import MigrationOwners
from godwit.cluster.node import ClusterNode
from godwit.cluster.plan_runner import LocalAgent
from godwit.containers import ContainerStore, HostNetworking
from godwit.criu import CriuCapabilities, probe, tune_host
from godwit.crl_push import crl_handler
from godwit.errors import Conflict, GodwitError, NotFound
from godwit.identity import Identity, IdentityError, identity_of
from godwit.image_config import Overrides
from godwit.limits import ConnectionGate, GatedSite
from godwit.limits import listen as listen_socket
from godwit.metrics import metrics_handler
from godwit.migration import MigrationOptions
from godwit.migration.failure_logs import FailureLogs
from godwit.migration.receiver import Receiver, check_free_disk
from godwit.migration.report import EventStream
from godwit.migration.service import Migrations
from godwit.network import ContainerNet
from godwit.openapi import document
from godwit.preflight import Finding, check_cpuinfo_image
from godwit.protocol import (
    PROTOCOL_VERSION,
    ROUTES,
    AdoptRequest,
    ArmRequest,
    ClockSample,
    ContainerInfo,
    ExecRequest,
    ExecResult,
    HostInfo,
    IncomingRequest,
    KeptLog,
    MigrationLogs,
    PreflightReply,
    PreflightRequest,
    QosState,
    Removed,
    Report,
    RestoreRequest,
    RunRequest,
    Signalled,
    SignalRequest,
    TlsExpiry,
    convert,
    decode,
    encode,
    to_json,
)
from godwit.qos import QosPolicy, apply_policy, clear_policy, describe_policy
from godwit.runc import DEFAULT_RUNC, Runc
from godwit.runc_features import RuncFeatures, probe_runc
from godwit.tls import RevocationList, TLSFiles, expiry, peer_certificate

log = logging.getLogger("godwit.agent")
M = TypeVar("M")
DEPARTURES_STOP_TIMEOUT_S = 5  # a stopping agent lets departed containers' deletion end


class Agent:
    """State and request handlers of one host's agent."""

    def __init__(self, name: str, state_dir: Path, runc_root: Path,
                 networking: HostNetworking | None = None, tls: TLSFiles | None = None,
                 qos: QosSetting | None = None, runc: str = DEFAULT_RUNC,
                 cluster: ClusterNode | None = None) -> None:
        self.cluster = cluster  # cluster mode: registered in etcd once it listens
        self.tls = tls
        self.qos = qos
        self.port = DEFAULT_PORT
        self.name = name
        self.state_dir = state_dir
        self.runc = Runc(runc_root, state_dir / "runc-work", runc)
        self.runc_features: RuncFeatures | None = None
        self.store = ContainerStore(state_dir, self.runc, name, networking)
        self.admission = Admission(state_dir, self.store.networking.bridge)
        self.failure_logs = FailureLogs(state_dir / "failed-logs")
        self.receiver = Receiver(self.store, state_dir, tls, self.failure_logs,
                                 device_rule=self.admission.device_rule,
                                 keeps_setid=self.admission.keeps_setid)
        self.migrations = Migrations(name, self.store, state_dir, self.describe_host, tls,
                                     self.failure_logs)
        self.etcd = cluster.migrations if cluster else None  # cluster mode
        self.receiver.cluster = self.migrations.cluster = self.etcd
        self.caps: CriuCapabilities | None = None

    async def start(self) -> None:
        if fault := faults.configured():
            log.warning("fault point armed (%s): %s at %s", faults.ENV, fault[1], fault[0])
        for change in await asyncio.to_thread(tune_host):
            log.info("host tuned for CRIU: %s", change)
        self.caps = await probe()
        self.migrations.criu, self.migrations.port = self.caps.to_json(), self.port
        self.runc_features = await probe_runc(self.runc.binary)
        log.info("runc %s (%s)", self.runc_features.version, self.runc.binary)
        self.receiver.sweep()
        self.store.departures.sweep()
        images.sweep(self.state_dir)
        self.runc.sweep_logs()
        self.failure_logs.prune()
        self.recovery = asyncio.create_task(self.migrations.recover())
        if self.qos:
            await asyncio.to_thread(apply_policy, self.qos.uplink, self.qos.policy)
            log.info("migration traffic on %s shaped: %s", self.qos.uplink, self.qos.policy)

    async def stop(self) -> None:
        await self.receiver.call_off_held()
        await self.store.departures.close(DEPARTURES_STOP_TIMEOUT_S)
        if self.qos:
            await asyncio.to_thread(clear_policy, self.qos.uplink)

    def app(self) -> web.Application:
        revocations = RevocationList(self.tls) if self.tls else None
        owners = MigrationOwners(self.receiver.root)
        audit = audit_middleware(AuditLog(self.state_dir / "audit.log"))
        middlewares = [audit, error_middleware, peer_middleware(revocations, owners)]
        app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
        app.add_routes([web.route(r.method, r.path, getattr(self, r.handler)) for r in ROUTES])
        # Prometheus text for scrapers, outside the JSON protocol and its OpenAPI document
        app.add_routes([web.get("/metrics", metrics_handler(self))])
        # an operator's fresh CRL (`godwit ca crl --push`): a PEM body, outside the protocol
        app.add_routes([web.put("/v1/crl", crl_handler(self.tls))])
        return app

    # host and containers
    async def info(self, request: web.Request) -> web.Response:
        return _reply(await self.describe_host())

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(document())

    async def describe_host(self) -> HostInfo:
        qos = await asyncio.to_thread(describe_policy, self.qos.uplink) if self.qos else None
        return HostInfo(
            name=self.name, godwit=__version__, protocol=PROTOCOL_VERSION,
            runc=await self.runc.version(), runc_features=self.runc_features, criu=self.caps,
            time=time.time(), containers=len(self.store.names()),
            mem_available=procfs.mem_available(), disk_free=shutil.disk_usage(self.state_dir).free,
            qos=convert(qos, QosState, "QoS state") if qos else None,
            tls=TlsExpiry(**expiry(self.tls)) if self.tls else None,
        )

    async def describe(self, name: str) -> ContainerInfo:
        return convert(await self.store.describe(name), ContainerInfo, "container")

    async def list_containers(self, request: web.Request) -> web.Response:
        return _reply(convert(await self.store.list(), list[ContainerInfo], "containers"))

    async def get_container(self, request: web.Request) -> web.Response:
        return _reply(await self.describe(request.match_info["name"]))

    async def run_container(self, request: web.Request) -> web.Response:
        body = await _body(request, RunRequest)
        await self.admission.check_run(body)
        if (body.image is None) == (body.bundle is None):
            raise GodwitError("give either a bundle or an image")
        if body.image is not None:
            overrides = Overrides.from_json((body.overrides or Overrides()).to_json())
            await images.create_from_image(self.store, body.name, body.image, overrides,
                                           body.net)
        else:
            await self.store.create(body.name, Path(body.bundle or ""), body.net)
        return _reply(await self.describe(body.name), status=201)

    async def adopt_container(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        where = adopt.Foreign.of(await _body(request, AdoptRequest), name)
        await adopt.adopt(self.store, name, where)
        return _reply(await self.describe(name), status=201)

    async def release_container(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.migrations.busy(name):
            raise Conflict(f"container {name} is being migrated")
        where = adopt.Foreign.of(await _body(request, AdoptRequest), name)
        return _reply(await adopt.release(self.store, name, where))

    async def remove_container(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.migrations.busy(name):
            raise Conflict(f"container {name} is being migrated")
        await self.store.remove(name)
        await self.migrations.settle(name)
        if self.etcd:
            await self.etcd.removed(name)
        return _reply(Removed(removed=name))

    async def exec_container(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await _body(request, ExecRequest)
        self.store.record(name)
        code, out, err = await self.runc.exec(name, body.argv)
        return _reply(ExecResult(exit_code=code, stdout=out, stderr=err))

    async def signal_container(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        signal = (await _body(request, SignalRequest)).signal
        self.store.record(name)
        await self.runc.kill(name, signal)
        return _reply(Signalled(signalled=name, signal=signal))

    async def resume_container(self, request: web.Request) -> web.Response:
        """Resume a paused copy, e.g. one a migration left paused when it ended in doubt;
        a networked container gets its link back first."""
        name = request.match_info["name"]
        record = self.store.record(name)
        if self.migrations.busy(name):
            raise Conflict(f"container {name} is being migrated")
        state = await self.store.state(name)
        if not state or state.status != "paused":
            raise Conflict(f"container {name} is {state.status if state else 'gone'}, "
                           "not paused")
        if record.net:
            if self.migrations.in_doubt(name):  # the destination's copy ran, then was fenced
                await asyncio.to_thread(self.store.networking.reset_connections, name,
                                        ContainerNet.from_json(record.net))
            await asyncio.to_thread(self.store.networking.connect, name)
        await self.runc.resume(name)
        await self.migrations.settle(name)
        return _reply(await self.describe(name))

    # migrations, source side
    async def migrate(self, request: web.Request) -> web.StreamResponse:
        options = await _body(request, MigrationOptions)
        events = await self.migrations.start(request.match_info["name"], options)
        return await _stream_events(request, events)

    async def plan_migration(self, name: str, options: MigrationOptions
                             ) -> AsyncIterator[dict]:
        """A migration for an evacuation plan (cluster mode): its events as plain JSON."""
        events = await self.migrations.start(name, options)
        while (event := await events.queue.get()) is not None:
            yield to_json(event)

    async def container_status(self, name: str) -> str | None:
        try:
            return (await self.describe(name)).status
        except NotFound:
            return None

    # pre-flight
    async def clock(self, request: web.Request) -> web.Response:
        received = time.time()
        return _reply(ClockSample(received=received, sent=time.time()))

    async def check_cpuinfo(self, request: web.Request) -> web.Response:
        return _reply(await check_cpuinfo_image(await request.read()))

    async def check_admission(self, request: web.Request) -> web.Response:
        """Would this host admit an incoming migration: its policy and free disk."""
        body = await _body(request, IncomingRequest)
        try:
            await self.admission.check_incoming(body)
            check_free_disk(self.receiver.root, body.upload_bytes, self.name)
        except GodwitError as exc:
            return _reply(Finding("admission", "error", str(exc)))
        return _reply(Finding("admission", "ok", f"admitted by {self.name}'s policy"))

    async def preflight(self, request: web.Request) -> web.Response:
        """`godwit check`: the pre-flight checks from this host to another, nothing frozen."""
        body = await _body(request, PreflightRequest)
        options = MigrationOptions(to=body.to, strategy=body.strategy)
        dest_info, findings = await self.migrations.check(body.container, options)
        return _reply(PreflightReply(source=self.name, destination=dest_info.name,
                                     findings=findings))

    async def history(self, request: web.Request) -> web.Response:
        return _reply(convert(self.migrations.reports.all(), list[Report], "saved reports"))

    async def report(self, request: web.Request) -> web.Response:
        report = self.migrations.reports.load(request.match_info["id"].replace("/", ""))
        if report is None:
            raise NotFound(f"no migration {request.match_info['id']} on {self.name}")
        return _reply(convert(report, Report, "saved report"))

    async def migration_logs(self, request: web.Request) -> web.Response:
        """The CRIU/runc logs this host kept of a failed migration (as source or
        destination); none kept is an empty list."""
        logs = await asyncio.to_thread(self.failure_logs.read, request.match_info["id"])
        return _reply(MigrationLogs(host=self.name, logs=convert(logs, list[KeptLog])))

    # migrations, destination side
    async def prepare_incoming(self, request: web.Request) -> web.Response:
        body = await _body(request, IncomingRequest)
        await self.admission.check_incoming(body)
        return _reply(await self.receiver.prepare(body))

    async def upload_incoming(self, request: web.Request) -> web.Response:
        info = request.match_info
        return _reply(await self.receiver.receive(info["id"], info["what"], request.content))

    async def arm_incoming(self, request: web.Request) -> web.Response:
        body = await _body(request, ArmRequest)
        local = request.transport.get_extra_info("sockname") if request.transport else None
        return _reply(await self.receiver.arm(request.match_info["id"], body.descriptors,
                                              local if body.stream_pages else None,
                                              request.remote, body.fill_after_restore,
                                              body.lazy_page_server, body.images_in_memory))

    async def activate_incoming(self, request: web.Request) -> web.Response:
        return _reply(await self.receiver.activate(request.match_info["id"]))

    async def restore_incoming(self, request: web.Request) -> web.Response:
        body = await _body(request, RestoreRequest) if request.can_read_body \
            else RestoreRequest()
        return _reply(await self.receiver.restore(request.match_info["id"], body.page_server))

    async def restore_with_images(self, request: web.Request) -> web.Response:
        return _reply(await self.receiver.restore_with_images(request.match_info["id"],
                                                              request.content))

    async def commit_incoming(self, request: web.Request) -> web.Response:
        return _reply(await self.receiver.commit(request.match_info["id"]))

    async def forget_incoming(self, request: web.Request) -> web.Response:
        return _reply(await self.receiver.forget(request.match_info["id"]))

    async def incoming_state(self, request: web.Request) -> web.Response:
        return _reply(self.receiver.state(request.match_info["id"]))

    async def incoming_pages(self, request: web.Request) -> web.Response:
        return _reply(await self.receiver.state_once_filled(request.match_info["id"]))

    async def abort_incoming(self, request: web.Request) -> web.Response:
        return _reply(await self.receiver.abort(request.match_info["id"]))


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure becomes `{"error": "one line"}` with a fitting status."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except NotFound as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except Conflict as exc:
        return web.json_response({"error": str(exc)}, status=409)
    except GodwitError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Exception as exc:
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": f"internal error: {exc}"}, status=500)


def peer_middleware(revocations: RevocationList | None, owners: MigrationOwners):
    """Per request: the peer's certificate must not be revoked (even on a connection opened
    before the revocation), must carry a godwit role allowed on the route (godwit.authz),
    and only the agent that prepared an incoming migration may act on it."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if not request.secure:
            return await handler(request)
        cert = peer_certificate(request)
        if cert is None or (revocations and revocations.is_revoked(cert.serial_number)):
            return _refuse(request, "certificate revoked")
        try:
            identity = identity_of(cert)
        except IdentityError as exc:
            return _refuse(request, str(exc))
        request["identity"] = identity
        match = request.match_info
        if match.http_exception is not None:  # no such route: 404/405 as usual
            return await handler(request)
        route = match.route.resource.canonical if match.route.resource else request.path
        migration_id = match.get("id", "") if route.startswith("/v1/incoming") else ""
        if reason := (authz.refusal(identity, request.method, route)
                      or owners.refusal(migration_id, identity)):
            return _refuse(request, reason)
        if route == "/v1/incoming" and request.method == "POST":
            return await _prepare_bound(request, handler, owners, identity)
        return await handler(request)

    return middleware


async def _prepare_bound(request: web.Request, handler, owners: MigrationOwners,
                         identity: Identity) -> web.StreamResponse:
    """Prepare an incoming migration and bind it to the agent that asked."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    response = await handler(request)
    migration_id = body.get("id") if isinstance(body, dict) else None
    if response.status == 200 and isinstance(migration_id, str) and "/" not in migration_id:
        owners.bind(migration_id, identity)
    return response


def _refuse(request: web.Request, reason: str) -> web.Response:
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote,
                reason)
    return web.json_response({"error": reason}, status=403, headers={"Connection": "close"})


async def _body(request: web.Request, kind: type[M]) -> M:
    """The request's JSON body as a protocol message (a bad one is a 400: GodwitError)."""
    return decode(await request.read(), kind)


def _reply(message: object, status: int = 200) -> web.Response:
    return web.Response(body=encode(message), status=status, content_type="application/json")


async def _stream_events(request: web.Request, events: EventStream) -> web.StreamResponse:
    """Send events as NDJSON; a client that goes away does not stop the migration."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    while (event := await events.queue.get()) is not None:
        try:
            await response.write(encode(event) + b"\n")
        except (ConnectionError, RuntimeError):
            log.warning("client left while migration %s runs on", events.report.id)
            return response
    await response.write_eof()
    return response


async def serve(agent: Agent, listen: str, server_ssl: ssl.SSLContext | None = None) -> None:
    """Run an agent until cancelled."""
    host, _, port = listen.rpartition(":")
    agent.port = int(port)
    await agent.start()
    gate = ConnectionGate()
    app = agent.app()
    app.middlewares.insert(0, gate.middleware)
    runner = web.AppRunner(app, access_log=None, read_bufsize=1 << 20,
                           keepalive_timeout=gate.limits.keepalive_timeout)
    await runner.setup()
    site = GatedSite(runner, listen_socket(host or "0.0.0.0", int(port), gate),
                     ssl_context=server_ssl)
    await site.start()
    log.info("agent %s listening on %s", agent.name, listen)
    try:
        if agent.cluster:
            await agent.cluster.join(LocalAgent(agent.plan_migration, agent.container_status))
            log.info("agent %s registered in etcd as %s", agent.name, agent.cluster.address)
        await asyncio.Event().wait()
    finally:
        if agent.cluster:
            await agent.cluster.leave()
        await runner.cleanup()
        await agent.stop()


@dataclass(frozen=True)
class QosSetting:
    """Shape this host's outgoing migration traffic on `uplink` (see qos.py)."""

    uplink: str
    policy: QosPolicy


def default_name() -> str:
    return socket.gethostname()
