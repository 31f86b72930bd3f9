"""Assembles and runs the daemon: gRPC (KServe v2, health, reflection), metrics
HTTP endpoint, model manager; then waits for SIGTERM/SIGINT and drains."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from daemon import __version__
from daemon.engines.cache import EngineCache
from daemon.engines.factory import EngineFactory
from daemon.engines.worker import BuildPool
from daemon.errors import TegradError
from daemon.processing.budget import set_daemon_budget
from daemon.protogen import admin_pb2_grpc
from daemon.protogen import grpc_service_pb2 as pb
from daemon.repository.manager import ModelManager
from daemon.repository.state import StateStore
from daemon.rollout.controller import RolloutOptions, Rollouts
from daemon.rollout.dropbox import DropBox
from daemon.rollout.operations import OperationBoard
from daemon.rollout.uploads import Uploads
from daemon.server import binding, restricted, tls
from daemon.server.admin_service import AdminService
from daemon.server.admission import RequestBytesBudget
from daemon.server.inference_service import InferenceService
from daemon.server.lifecycle import Lifecycle, sd_notify, watchdog_interval
from daemon.server.shared_memory import Limits, SharedMemoryRegistry
from daemon.telemetry import metrics
from daemon.telemetry.collector import start_device_telemetry

log = logging.getLogger("tegrad")

EMBEDDED_REPOSITORY = Path(__file__).resolve().parent.parent / "models"
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_STREAM_GRACE_S = 0.5


@dataclass
class ServeOptions:
    repository: Path | None = None
    model_control: str = "none"
    load_models: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    state_dir: Path = Path("~/.local/state/tegrad").expanduser()
    max_message_bytes: int = 64 * 1024 * 1024
    max_decode_bytes: int | None = None  # decoded images in flight; None: daemon.processing.budget's default
    drain_timeout: float = 30.0
    engine_cache_dir: Path | None = None  # default: <state_dir>/engines
    engine_cache_max_bytes: int = 8 << 30
    build_jobs: int = 1
    # Admin API (tegrad.v1.Admin): a Unix socket (default <state_dir>/admin.sock; "" turns it off)
    # and optionally TCP, only with TLS client certificates.
    admin_socket: str | None = None
    admin_listen: str = ""
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_client_ca: Path | None = None
    trust_dir: Path | None = None  # default: <state_dir>/trusted-keys
    allow_unsigned: bool = False
    keep_versions: int = 3
    auto_activate: bool = False
    dropbox: Path | None = None
    max_bundle_bytes: int = 4 << 30
    # Triton's system shared-memory extension (--allow-client-shm in Triton): off by default,
    # because a registered region lets a local client map memory into the daemon.
    allow_shared_memory: bool = False
    shared_memory_max_regions: int = 64
    shared_memory_max_bytes: int = 1 << 30
    telemetry_period: float = 1.0  # seconds between device telemetry reads; 0 = off
    telemetry_root: Path = Path("/")  # where the device's /sys, /proc and /etc are (a container's host mount)
    # Limits a device needs (Triton has none): HTTP/2 streams per connection, and the bytes
    # of inference requests parsed, decoded and run at once, daemon-wide.
    grpc_max_concurrent_streams: int = 256
    max_inflight_request_bytes: int = 512 << 20
    restricted_protocols: list[str] = field(default_factory=list)  # Triton's --grpc-restricted-protocol


class Health(HealthServicer):
    """gRPC health: SERVING exactly when the server is ready (any service name, as Triton does)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        super().__init__()
        self._lifecycle = lifecycle
        self._last: bool | None = None

    async def Check(self, request, context):
        serving = self._lifecycle.ready()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def sync(self) -> None:
        """Push readiness to Watch streams now (Check reads it directly)."""
        serving = self._lifecycle.ready()
        if serving != self._last:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", INFERENCE_SERVICE):
                await self.set(name, status)
            self._last = serving
            metrics.READY.set(1 if serving else 0)

    async def track(self) -> None:
        # Model loads and unloads change readiness at any time; polling catches them.
        while True:
            await self.sync()
            await asyncio.sleep(0.5)


def _admin_server(opts: ServeOptions, rollouts: Rollouts) -> tuple[grpc.aio.Server, list[str]] | None:
    """The admin API on its own listener(s), never on the inference port."""
    socket = opts.admin_socket if opts.admin_socket is not None else str(opts.state_dir / "admin.sock")
    if not socket and not opts.admin_listen:
        return None
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)])
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(rollouts), server)
    where = []
    if socket:
        path = Path(socket).absolute()
        if len(str(path)) > 107:
            raise ValueError(f"admin socket path {path} is longer than the 107 bytes a Unix socket allows; "
                             "give a shorter --admin-socket")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only from the first instant: the socket is created under this umask.
        old = os.umask(0o177)
        try:
            if server.add_insecure_port(f"unix:{path}") == 0:
                raise ValueError(f"cannot listen on the admin socket {path}")
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        where.append(f"unix:{path}")
    if opts.admin_listen:
        port = server.add_secure_port(opts.admin_listen, tls.server_credentials(
            opts.admin_tls_cert, opts.admin_tls_key, opts.admin_client_ca))
        if port == 0:
            raise ValueError(f"cannot listen on {opts.admin_listen} for the admin API")
        host = opts.admin_listen.rsplit(":", 1)[0]
        where.append(f"{host}:{port} (TLS, client certificates required)")
    return server, where


async def serve(opts: ServeOptions) -> int:
    repository = opts.repository or EMBEDDED_REPOSITORY
    if opts.max_decode_bytes is not None:
        set_daemon_budget(opts.max_decode_bytes)
    try:
        store = StateStore(opts.state_dir / "state.sqlite3")
    except TegradError as exc:  # a clear line, not a traceback (systemd restarts it after a pause)
        log.error("%s", exc)
        return 1
    cache = EngineCache(opts.engine_cache_dir or opts.state_dir / "engines", opts.engine_cache_max_bytes)
    factory = EngineFactory(cache, BuildPool(opts.build_jobs))
    models = ModelManager(repository, store, factory, control_mode=opts.model_control, drain_timeout=opts.drain_timeout)
    lifecycle = Lifecycle(models)
    rollouts = Rollouts(
        repository, store, models, factory, Uploads(opts.state_dir / "uploads", opts.max_bundle_bytes),
        OperationBoard(store),
        RolloutOptions(trust_dir=opts.trust_dir or opts.state_dir / "trusted-keys", allow_unsigned=opts.allow_unsigned,
                       keep_versions=opts.keep_versions, auto_activate=opts.auto_activate,
                       max_bundle_bytes=opts.max_bundle_bytes, read_only=repository == EMBEDDED_REPOSITORY),
    )
    rollouts.recover()
    models.precision_rollback = rollouts.rollback
    try:
        admin = _admin_server(opts, rollouts)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1

    try:
        restrictions = restricted.rules(opts.restricted_protocols)
    except ValueError as exc:
        log.error("%s", exc)
        return 1
    server = grpc.aio.server(
        interceptors=[restricted.RestrictedProtocols(restrictions)] if restrictions else None,
        options=[
            ("grpc.max_receive_message_length", opts.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", opts.grpc_max_concurrent_streams),
            ("grpc.so_reuseport", 0),
        ]
    )
    shared_memory = SharedMemoryRegistry(opts.allow_shared_memory, Limits(opts.shared_memory_max_regions,
                                                                          opts.shared_memory_max_bytes))
    inference = InferenceService(models, lifecycle, RequestBytesBudget(opts.max_inflight_request_bytes), shared_memory)
    server.add_generic_rpc_handlers((binding.inference_handler(inference, inference.unparsable),))
    health = Health(lifecycle)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    grpc_port = server.add_insecure_port(f"{opts.host}:{opts.grpc_port}")
    if grpc_port == 0:
        log.error("cannot listen on %s:%d (in use?)", opts.host, opts.grpc_port)
        return 1

    from prometheus_client import start_http_server

    metrics_server, metrics_thread = start_http_server(opts.metrics_port, addr=opts.host)
    metrics_port = metrics_server.server_port
    device_telemetry = start_device_telemetry(opts.telemetry_period, opts.telemetry_root)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lifecycle.request_stop, sig.name)

    await server.start()
    if admin is not None:
        await admin[0].start()
        log.info("admin API on %s", ", ".join(admin[1]))
    log.info("tegrad %s live: grpc=%s:%d metrics=%s:%d repository=%s", __version__, opts.host, grpc_port,
             opts.host, metrics_port, repository)
    if opts.host in ("0.0.0.0", "::", "") and not restrictions:
        log.warning("gRPC listens on all interfaces with no --grpc-restricted-protocol: anyone who reaches port %d "
                    "can use every RPC; use --host 127.0.0.1 when only apps on this device call tegrad", grpc_port)
    background = [asyncio.ensure_future(health.track())]
    if opts.dropbox is not None:
        background.append(asyncio.ensure_future(DropBox(opts.dropbox, rollouts).run()))
    interval = watchdog_interval()
    if interval:
        background.append(asyncio.ensure_future(lifecycle.watchdog(interval)))

    # Startup builds may take minutes on a Jetson; a SIGTERM meanwhile cancels them (killing the workers).
    startup = asyncio.ensure_future(models.startup(opts.load_models))
    stop = asyncio.ensure_future(lifecycle.stop_requested.wait())
    await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
    if startup.done():
        lifecycle.started = True
        await health.sync()  # watchers learn at once, not at the next poll
        loaded = len(models.loaded())
        log.info("tegrad ready: %d model version(s) loaded, ready=%s", loaded, lifecycle.ready())
        sd_notify(f"READY=1\nSTATUS=serving {loaded} model version(s)")
        await stop
    else:
        log.info("stop requested during startup: cancelling model loads and engine builds")
        startup.cancel()
        await asyncio.gather(startup, return_exceptions=True)
    lifecycle.draining = True
    # Health NOT_SERVING, permanently, so load balancers move away while the server still
    # answers: new inference requests get UNAVAILABLE with a reason, in-flight ones finish.
    await health.enter_graceful_shutdown()
    sd_notify("STOPPING=1\nSTATUS=draining")
    log.info("draining: no new requests; waiting up to %.0f s for in-flight ones", opts.drain_timeout)
    if not await lifecycle.wait_idle(opts.drain_timeout):
        log.warning("drain timeout: cancelling %d request(s) still in flight", lifecycle.inflight)
    # What is left holds no inference work (health watches, idle streams); a grace as long
    # as the drain timeout would only keep those open and delay the exit.
    await server.stop(grace=_STREAM_GRACE_S)
    if admin is not None:
        await admin[0].stop(grace=_STREAM_GRACE_S)
    await rollouts.stop()
    await models.shutdown()
    shared_memory.close()
    for task in background:
        task.cancel()
    if device_telemetry is not None:
        device_telemetry.stop()
    metrics_server.shutdown()
    metrics_thread.join(timeout=5)
    store.close()
    log.info("tegrad stopped")
    return 0
