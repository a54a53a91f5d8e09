"""Building the server from settings: `build_server(settings) -> FaceGateServer`.

Building binds the port, loads and warms the recognition workers and rebuilds the matching
index from the store; only the entry point (cli.py) waits for signals and serves.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facegate_server.config import Settings
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local import LocalEngine, WorkerPool
from facegate_server.gate import Gate
from facegate_server.servicer import FaceGateServicer
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

    def start(self) -> None:
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, release all."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.pool.close()
        self.store.close()


def build_server(settings: Settings, *, store: Store | None = None) -> FaceGateServer:
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
        engine = LocalEngine(pool, index, settings.match_threshold)
        gate = Gate(
            store,
            engine,
            identify_budget=settings.identify_budget_ms / 1000,
            enroll_timeout=settings.enroll_timeout_s,
            max_photos=settings.max_photos,
            keep_photos=settings.keep_photos,
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(8, 4 * settings.workers)),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
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
        port = server.add_insecure_port(settings.listen)
    except BaseException:
        pool.close()
        store.close()
        raise
    if port == 0:
        pool.close()
        store.close()
        raise OSError(f"could not listen on {settings.listen}")
    return FaceGateServer(server, port, gate, health_servicer, pool, store)
