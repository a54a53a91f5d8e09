"""Building the server from settings: `build_server(settings) -> FaceGateServer`.

This is the one place that knows the concrete parts: it builds the store, the engines (the
local engine's workers warmed and its index rebuilt from the store; the Azure engine, its
read model and its outbox replayer when configured; the router between them), the gate,
and the gRPC server; only the entry point (commands/serve.py) waits for signals and serves.
Tests pass their own store, engine and clock: a server built with the in-memory fake engine
(engines/memory.py) starts no recognition worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import threadpoolctl
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

from facegate_server.cloud.azure import AzureFace, AzureSettings
from facegate_server.cloud.cost import PriceModel
from facegate_server.cloud.engine import AzureEngine, CloudPeople
from facegate_server.cloud.health import CloudHealth
from facegate_server.cloud.ratelimit import TIER_RATES, CloudRate
from facegate_server.cloud.sync import CloudSync
from facegate_server.config import Settings
from facegate_server.domain import EngineStatus
from facegate_server.engines.base import RecognitionEngine
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local import LocalEngine, WorkerPool
from facegate_server.engines.policy import decision_policy
from facegate_server.gate import Clock, Gate, utc_now
from facegate_server.membership import Site, load_zone
from facegate_server.routing.breaker import CircuitBreaker, CircuitState
from facegate_server.routing.router import Agreement, Policy, RoutingEngine
from facegate_server.rpc import auth, ratelimit, tls
from facegate_server.rpc.intercept import Refusals
from facegate_server.rpc.server import RpcServer
from facegate_server.rpc.servicer import FaceGateServicer
from facegate_server.store import SqliteStore, Store

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["FaceGateService"].full_name
STORE_HEALTH = "facegate.v1.Store"
"""The health service's name for the chain's shared store: SERVING while it is reachable,
NOT_SERVING while the server decides from its local copy (the server itself stays
SERVING). Unknown to the health service of a server with its own SQLite file."""


@dataclass
class FaceGateServer:
    rpc: RpcServer
    port: int
    gate: Gate
    store: Store
    background_sync: bool = True
    """Replay the outbox in a background thread (tests call `gate.replayer.run_once()`)."""

    _watch: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        if self.gate.replayer is not None and self.background_sync:
            self.gate.replayer.start()
        self.rpc.start()
        self._watch = threading.Thread(target=self._watch_health, name="health", daemon=True)
        self._watch.start()

    def _watch_health(self) -> None:
        """Health NOT_SERVING while the server cannot decide at all (no recognition worker
        and no reachable cloud), SERVING again when it can."""
        serving = True
        store_up: bool | None = None
        while True:
            state = self.store.state()
            if state.kind != "local" and (state.state == "connected") != store_up:
                store_up = state.state == "connected"
                self.rpc.set_health(STORE_HEALTH, store_up)
            if self._stopping.wait(0.25):
                break
            can = self.gate.status_engines().can_decide
            if can != serving:
                serving = can
                log.warning("the server %s decide", "can" if can else "cannot")
                self.rpc.set_serving(can)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, release all."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join()
        self.rpc.stop(grace)
        if self.gate.replayer is not None:
            self.gate.replayer.stop()
            log.info(
                "cloud transactions",
                extra={"by_operation": self.gate.replayer.face.counter.totals()},
            )
        self.gate.engine.close()
        self.store.close()


def build_cloud(
    settings: Settings, store: Store, clock: Callable[[], float]
) -> tuple[AzureEngine, CircuitBreaker, CloudSync]:
    """The Azure engine, the turnstiles' circuit breaker (Identify's alone), and the outbox
    replayer (with its own back-off), sharing the read model of cloud persons, the
    readiness of the cloud and the client-side rate limit."""
    rate = settings.azure_rate
    face = AzureFace(
        AzureSettings(
            endpoint=settings.azure_endpoint.rstrip("/"),
            key=settings.azure_key,
            group_id=settings.azure_group_id,
            recognition_model=settings.azure_recognition_model,
            detection_model=settings.azure_detection_model,
            read_timeout=settings.azure_timeout_s,
            # Below the threshold by the margin: a close runner-up must be seen.
            identify_confidence=max(0.0, settings.azure_threshold - settings.azure_margin),
            store_id=store.store_id(),
        ),
        rate=CloudRate(TIER_RATES[settings.azure_tier] if rate is None else rate, clock=clock),
    )
    breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s, clock)
    people = CloudPeople(store)
    health = CloudHealth()
    sync = CloudSync(face, store, people, health, interval=settings.sync_interval_s, clock=clock)
    engine = AzureEngine(
        face,
        people,
        health=health,
        threshold=settings.azure_threshold,
        margin=settings.azure_margin,
        dominant_face_ratio=settings.dominant_face_ratio,
    )
    return engine, breaker, sync


def build_local(settings: Settings, store: Store) -> LocalEngine:
    """The local engine: its workers started and warmed, its index rebuilt from the store."""
    # Matching runs in this process, one small matrix product per frame: BLAS threads
    # would spin between frames and fight the workers for the cores (measured at 10,000
    # templates: 22.5 ms a match with OpenBLAS's threads, 0.53 ms with one; benchmarks/README).
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    pool = WorkerPool(
        settings.workers,
        max_bytes=settings.max_image_bytes,
        max_side=settings.max_image_side,
        encoder=settings.encoder,
        max_photo_bytes=settings.max_photo_bytes,
    )
    try:
        index = FaceIndex(store.iter_embeddings())
        log.info(
            "matching index built", extra={"templates": len(index), "members": index.member_count()}
        )
        pool.warm_up()
    except BaseException:
        pool.close()
        raise
    log.info("recognition workers ready", extra={"workers": settings.workers})
    return LocalEngine(pool, index, decision_policy(settings))


def build_engine(
    settings: Settings, store: Store, local: RecognitionEngine, clock: Callable[[], float]
) -> tuple[RecognitionEngine, CloudSync | None, Callable[[], EngineStatus]]:
    """The engine the gate asks (the router), the outbox replayer, and their status."""
    azure, breaker, sync = None, None, None
    if settings.cloud_enabled:
        azure, breaker, sync = build_cloud(settings, store, clock)
        log.info(
            "cloud engine configured",
            extra={
                "endpoint": settings.azure_endpoint,
                "group": settings.azure_group_id,
                "policy": settings.policy,
            },
        )
    prices = PriceModel(
        settings.azure_tier,
        settings.azure_price_per_1000,
        settings.azure_storage_price_per_1000_faces,
        settings.azure_free_transactions,
    )
    router = RoutingEngine(
        local,
        azure,
        policy=Policy(settings.policy),
        agreement=Agreement(settings.on_disagreement),
        breaker=breaker,
        cloud_slots=settings.cloud_slots,
        local_confident=settings.local_confident,
        clock=clock,
    )

    def workers() -> dict[str, Any]:
        """The local engine's workers, when it has them, and whether anything can decide."""
        pool = local.pool if isinstance(local, LocalEngine) else None
        if pool is None:
            return {}
        cloud_up = breaker is not None and breaker.state is not CircuitState.OPEN
        return {
            "workers": pool.state(),
            "recognition_queue": pool.admission.queued(),
            "admission": pool.admission.snapshot(),
            "can_decide": pool.live() > 0 or cloud_up,
        }

    def status() -> EngineStatus:
        if sync is None:
            return EngineStatus(policy=router.policy.value, **workers())
        error, error_time = max(
            (router.last_error, router.last_error_time),
            (sync.last_error, sync.last_error_time),
            key=lambda e: e[1],
        )
        return EngineStatus(
            policy=router.policy.value,
            circuit=router.breaker.state.value,
            last_cloud_error=error,
            last_cloud_error_time=datetime.fromtimestamp(error_time, UTC) if error_time else None,
            cloud_training=sync.training.value
            + (" (one more queued)" if sync.training_queued else ""),
            cloud_transactions=sync.face.counter.totals(),
            cloud_readiness=sync.health.state.describe(),
            outbox_waiting=sync.waiting,
            cloud_cost=prices.describe(sync.face.counter.totals()),
            reconciliation=sync.reconciliation,
            **workers(),
        )

    return router, sync, status


COPY_FILE = "gallery-copy.sqlite3"
"""A chain server's local copy of the shared gallery, in data_dir (store/replica.py)."""


def build_store(settings: Settings) -> Store:
    """The store the settings name: SQLite in data_dir, or the chain's: the shared
    PostgreSQL and this server's local copy of the gallery in data_dir."""
    if not settings.store:
        return SqliteStore(settings.db_path)
    from facegate_server.store.chain import ChainStore

    return ChainStore(settings.store, settings.data_dir / COPY_FILE)


def build_server(
    settings: Settings,
    *,
    store: Store | None = None,
    engine: RecognitionEngine | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Clock = utc_now,
) -> FaceGateServer:
    """Build (not start) the server. `engine` replaces the local engine (the router's
    local part: the cloud, when configured, is still built from settings); `clock` is
    the monotonic clock of the breaker, the rate limits and the outbox replayer;
    `wall_clock` the gate's (times in the store, and the membership rules')."""
    # Security settings first: a refusal (open beyond loopback, bad files) starts nothing.
    callers = auth.load_callers(
        settings.tokens_file, settings.tokens, client_ca=settings.tls_client_ca is not None
    )
    open_warning = auth.check_exposure(settings.listen, callers, insecure=settings.insecure)
    credentials = tls.server_credentials(
        settings.tls_cert, settings.tls_key, settings.tls_client_ca
    )
    store = store if store is not None else build_store(settings)
    router: RecognitionEngine | None = None
    try:
        local = engine if engine is not None else build_local(settings, store)
        router, replayer, engine_status = build_engine(settings, store, local, clock)
        follow = getattr(store, "follow", None)
        if follow is not None:  # the chain: the engines follow the shared change log
            follow(router)
        refusals = Refusals()
        gate = Gate(
            store,
            router,
            identify_budget=settings.identify_budget_ms / 1000,
            enroll_timeout=settings.enroll_timeout_s,
            max_photos=settings.max_photos,
            keep_photos=settings.keep_photos,
            replayer=replayer,
            engine_status=engine_status,
            refusals=refusals.counts,
            clock=wall_clock,
            site=Site(settings.site_id, load_zone(settings.site_time_zone)),
        )
        servicer = FaceGateServicer(gate)
        threads = max(8, 4 * settings.workers)
        rpc = RpcServer(
            listen=settings.listen,
            credentials=credentials,
            register=lambda server: pb_grpc.add_FaceGateServiceServicer_to_server(servicer, server),
            service_names=(SERVICE_NAME,),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ],
            interceptors=[  # authentication first: rate limits are per admitted caller
                auth.interceptor(callers, refusals),
                ratelimit.interceptor(
                    (settings.identify_rate, settings.identify_burst),
                    (settings.enroll_rate, settings.enroll_burst),
                    clock,
                    refusals,
                ),
            ],
            threads=threads,
            queue=2 * threads,
            refusals=refusals,
            on_busy=servicer.refused_busy,
        )
        log.info(
            "security",
            extra={
                "callers": len(callers),
                "tls": tls.describe(settings.tls_cert, settings.tls_client_ca),
            },
        )
        if open_warning:
            log.warning(open_warning)
    except BaseException:
        if router is not None:
            router.close()
        store.close()
        raise
    if rpc.port == 0:
        rpc.stop(0)
        router.close()
        store.close()
        raise OSError(f"could not listen on {settings.listen}")
    return FaceGateServer(rpc, rpc.port, gate, store)
