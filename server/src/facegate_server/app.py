"""Building the server from settings: `build_server(settings) -> FaceGateServer`.

Building binds the port, loads and warms the recognition workers and rebuilds the matching
index from the store; only the entry point (cli.py) waits for signals and serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facegate_server.cloud.azure import AzureEngine, AzureFace, AzureSettings
from facegate_server.cloud.sync import CloudSync
from facegate_server.config import Settings
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local import LocalEngine, WorkerPool
from facegate_server.engines.policy import decision_policy
from facegate_server.gate import Gate
from facegate_server.routing.breaker import CircuitBreaker
from facegate_server.routing.router import Agreement, Policy, RoutingEngine
from facegate_server.rpc import auth, ratelimit, tls
from facegate_server.rpc.servicer import FaceGateServicer
from facegate_server.store import SqliteStore, Store

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["FaceGateService"].full_name


@dataclass
class FaceGateServer:
    server: grpc.Server
    port: int
    gate: Gate
    health: health.HealthServicer
    pool: WorkerPool
    store: Store
    background_sync: bool = True
    """Replay the outbox in a background thread (tests drive `gate.cloud.settle()`)."""

    def start(self) -> None:
        self.server.start()
        if self.gate.cloud is not None and self.background_sync:
            self.gate.cloud.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, release all."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.gate.cloud is not None:
            self.gate.cloud.stop()
            log.info(
                "cloud transactions",
                extra={"by_operation": self.gate.cloud.face.counter.totals()},
            )
        if self.gate.routing is not None:
            self.gate.routing.close()
        self.pool.close()
        self.store.close()


def build_cloud(
    settings: Settings, store: Store, clock: Callable[[], float]
) -> tuple[AzureEngine, CircuitBreaker, CloudSync]:
    """The Azure engine, its circuit breaker, and the outbox replayer."""
    face = AzureFace(
        AzureSettings(
            endpoint=settings.azure_endpoint.rstrip("/"),
            key=settings.azure_key,
            group_id=settings.azure_group_id,
            recognition_model=settings.azure_recognition_model,
            detection_model=settings.azure_detection_model,
            read_timeout=settings.azure_timeout_s,
        )
    )
    breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s, clock)
    sync = CloudSync(face, store, breaker, interval=settings.sync_interval_s)
    return AzureEngine(face, store), breaker, sync


def build_server(
    settings: Settings,
    *,
    store: Store | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FaceGateServer:
    # Security settings first: a refusal (open beyond loopback, bad files) starts nothing.
    callers = auth.load_callers(
        settings.tokens_file, settings.tokens, client_ca=settings.tls_client_ca is not None
    )
    open_warning = auth.check_exposure(settings.listen, callers, insecure=settings.insecure)
    credentials = tls.server_credentials(
        settings.tls_cert, settings.tls_key, settings.tls_client_ca
    )
    store = store if store is not None else SqliteStore(settings.db_path)
    pool = WorkerPool(
        settings.workers, max_bytes=settings.max_image_bytes, max_side=settings.max_image_side
    )
    try:
        index = FaceIndex(store.iter_embeddings())
        log.info(
            "matching index built", extra={"templates": len(index), "members": index.member_count()}
        )
        pool.warm_up()
        log.info("recognition workers ready", extra={"workers": settings.workers})
        engine = LocalEngine(pool, index, decision_policy(settings))
        router, cloud = None, None
        if settings.cloud_enabled:
            azure, breaker, cloud = build_cloud(settings, store, clock)
            router = RoutingEngine(
                engine,
                azure,
                store,
                policy=Policy(settings.policy),
                agreement=Agreement(settings.on_disagreement),
                breaker=breaker,
                cloud_slots=settings.cloud_slots,
                local_confident=settings.local_confident,
            )
            log.info(
                "cloud engine configured",
                extra={
                    "endpoint": settings.azure_endpoint,
                    "group": settings.azure_group_id,
                    "policy": settings.policy,
                },
            )
        gate = Gate(
            store,
            engine,
            identify_budget=settings.identify_budget_ms / 1000,
            enroll_timeout=settings.enroll_timeout_s,
            max_photos=settings.max_photos,
            keep_photos=settings.keep_photos,
            router=router,
            cloud=cloud,
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(8, 4 * settings.workers)),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ],
            interceptors=[  # authentication first: rate limits are per admitted caller
                auth.interceptor(callers),
                ratelimit.interceptor(
                    (settings.identify_rate, settings.identify_burst),
                    (settings.enroll_rate, settings.enroll_burst),
                    clock,
                ),
            ],
        )
        pb_grpc.add_FaceGateServiceServicer_to_server(FaceGateServicer(gate), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in ("", SERVICE_NAME):
            health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = tls.bind(server, settings.listen, credentials)
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
        pool.close()
        store.close()
        raise
    if port == 0:
        pool.close()
        store.close()
        raise OSError(f"could not listen on {settings.listen}")
    return FaceGateServer(server, port, gate, health_servicer, pool, store)
