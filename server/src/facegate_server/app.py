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
from collections.abc import Callable, Sequence
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
from facegate_server.cloud.lease import REPLAYER, PostgresLease
from facegate_server.cloud.ratelimit import TIER_RATES, CloudRate
from facegate_server.cloud.sync import CloudSync
from facegate_server.config import Settings
from facegate_server.domain import (
    EngineKind,
    EngineStatus,
    FaceTemplate,
    Identification,
    SearchResult,
    StoreState,
)
from facegate_server.engines.base import Attempt, RecognitionEngine
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local import LocalEngine, WorkerPool
from facegate_server.engines.policy import decision_policy
from facegate_server.errors import RecognitionUnavailable
from facegate_server.feed import EventBell, EventFeed
from facegate_server.gate import Clock, Gate, utc_now
from facegate_server.membership import Site, load_zone
from facegate_server.metrics import Metrics, MetricsServer
from facegate_server.permissions import startup_findings, tokens_file
from facegate_server.retention import Retention, chain_lease
from facegate_server.routing.breaker import CircuitBreaker, CircuitState
from facegate_server.routing.router import Agreement, Policy, RoutingEngine
from facegate_server.rpc import auth, ratelimit, tls
from facegate_server.rpc.auth import SecurityConfigError
from facegate_server.rpc.intercept import Refusals
from facegate_server.rpc.server import Lane, MessageLimit, RpcServer
from facegate_server.rpc.servicer import FaceGateServicer
from facegate_server.store import SqliteStore, Store
from facegate_server.store.sqlite import sqlite_files

log = logging.getLogger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["FaceGateService"].full_name
DOOR_METHODS = frozenset(f"/{SERVICE_NAME}/{method}" for method in ("Identify", "Verify"))
"""The turnstiles' methods: served by threads of their own (the "door" lane)."""
PHOTO_METHODS = frozenset(
    f"/{SERVICE_NAME}/{method}" for method in ("Enroll", "AddMemberPhotos", "SearchFaces")
)
"""The backend's methods that wait on recognition (seconds for ten large photos): threads
of their own too, so that a suspension or a deletion never waits behind enrolments."""
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
    retention: Retention | None = None
    """Deletes access events past retention, at start and hourly (tests: `run_once()`)."""
    # Reload without a restart (SIGHUP): what `reload` re-reads, and what it replaces.
    settings: Settings | None = None
    authenticator: auth.Authenticator | None = None
    certificates: tls.Certificates | None = None
    metrics: MetricsServer | None = None
    """The Prometheus endpoint (FACEGATE_METRICS_LISTEN), when configured."""
    feed: EventFeed | None = None
    """The followers of the access log (WatchAccessEvents): ended first when stopping."""

    _watch: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def cannot_decide(self) -> str:
        """Why the server cannot decide at all for want of a gallery ("" when it can)."""
        return cannot_decide(self.store.state())

    def start(self) -> None:
        if self.metrics is not None:
            self.metrics.start()
        if self.gate.replayer is not None and self.background_sync:
            self.gate.replayer.start()
        self.rpc.start()
        if self.cannot_decide():
            self.rpc.set_serving(False)  # at once; the watch says SERVING once it can
        if self.retention is not None:
            self.retention.start()
        self._watch = threading.Thread(target=self._watch_health, name="health", daemon=True)
        self._watch.start()

    def _watch_health(self) -> None:
        """Health NOT_SERVING while the server cannot decide at all (no recognition worker
        and no reachable cloud; a chain server with no local copy of the gallery yet),
        SERVING again when it can."""
        uncopied = cannot_decide(self.store.state())
        serving = not uncopied
        store_up: bool | None = None
        while True:
            state = self.store.state()
            if state.kind != "local" and (state.state == "connected") != store_up:
                store_up = state.state == "connected"
                self.rpc.set_health(STORE_HEALTH, store_up)
            if self._stopping.wait(0.25):
                break
            if uncopied:  # a copy once made is never unmade: no need to look again after
                uncopied = cannot_decide(self.store.state())
            can = self.gate.status_engines().can_decide and not uncopied
            if can != serving:
                serving = can
                log.warning("the server %s decide", "can" if can else "cannot")
                self.rpc.set_serving(can)

    def reload(self) -> bool:
        """Re-read the callers (the tokens file) and the TLS certificate, key and client CA
        (SIGHUP). All or nothing: a file that cannot be used is logged and the previous
        callers and certificate stay. Calls in flight finish as they were admitted; a
        removed token is refused from the next call; new connections get the new
        certificate. False when refused."""
        settings, authenticator = self.settings, self.authenticator
        if settings is None or authenticator is None:
            return False
        try:
            callers = auth.load_callers(
                settings.tokens_file, settings.tokens, client_ca=settings.tls_client_ca is not None
            )
            if callers.open and not authenticator.callers.open:
                raise SecurityConfigError(
                    "no callers are configured any more: that would open the server to everyone"
                )
            if self.certificates is not None:
                self.certificates.reload()  # the last check: after it, nothing can fail
        except (SecurityConfigError, OSError, UnicodeDecodeError) as error:
            log.error(
                "reload refused: the previous callers and certificate stay",
                extra={"error": str(error)},
            )
            return False
        authenticator.callers = callers  # one reference: each call sees old or new
        for finding in tokens_file(settings.tokens_file):
            log.warning(finding.message, extra=finding.log_fields())
        log.info(
            "reloaded",
            extra={
                "callers": len(callers),
                "tls": tls.describe(settings.tls_cert, settings.tls_client_ca),
            },
        )
        return True

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let calls in flight finish for `grace` seconds, release all."""
        self._stopping.set()
        if self.feed is not None:
            self.feed.close()  # followers end now (UNAVAILABLE), not after the grace period
        if self._watch is not None:
            self._watch.join()
        self.rpc.stop(grace)
        if self.retention is not None:
            self.retention.stop()
        if self.metrics is not None:  # scraped until the calls in flight are done
            self.metrics.stop()
        if self.feed is not None:
            self.feed.shutdown()
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
    # The chain's servers share the outbox in PostgreSQL: the lease lives there too, unless
    # FACEGATE_CLOUD_LEASE_URL names another database.
    lease_url = settings.cloud_lease_url or settings.store
    lease = (
        PostgresLease(
            lease_url,
            # One lease per outbox: servers sharing a store share its identity.
            name=f"{REPLAYER}:{store.store_id()}",
            ttl=settings.cloud_lease_ttl_s,
            # A check wants the lease to outlast the write it precedes.
            margin=min(settings.cloud_lease_ttl_s / 2, settings.azure_timeout_s + 1),
        )
        if lease_url
        else None
    )
    sync = CloudSync(
        face,
        store,
        people,
        health,
        interval=settings.sync_interval_s,
        clock=clock,
        lease=lease,
    )
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
        queue=settings.recognition_queue,
        per_caller=settings.recognition_per_caller,
        margin=settings.recognition_margin,
        hang_after=settings.worker_hang_s,
        job_limit=settings.worker_job_limit_s,
        start_timeout=settings.worker_start_timeout_s,
        pin=settings.worker_pin,
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


# Bounded memory before authentication: the methods that take one frame.
FRAME_METHODS = ("Identify", "Verify", "SearchFaces")
FRAME_MESSAGE_MARGIN = 64 * 1024
"""What a frame method's message may hold besides its image (its ids: a few hundred bytes)."""


def frame_limits(max_image_bytes: int) -> dict[str, MessageLimit]:
    """The message limit of each frame method: one image of FACEGATE_MAX_IMAGE_BYTES and its
    ids, far below the server-wide limit that fits an Enroll of the most photos."""
    limit = MessageLimit(
        max_image_bytes + FRAME_MESSAGE_MARGIN,
        "image",
        "IMAGE_TOO_LARGE",  # as when the image alone is over the limit (validation.py)
        f"one image of at most FACEGATE_MAX_IMAGE_BYTES = {max_image_bytes} bytes, and its "
        f"ids in {FRAME_MESSAGE_MARGIN} bytes",
    )
    service = pb.DESCRIPTOR.services_by_name["FaceGateService"].full_name
    return {f"/{service}/{method}": limit for method in FRAME_METHODS}


class StoreRefused(RuntimeError):
    """The shared store cannot be used, and waiting will not mend it (no such database,
    authentication failed, invalid connection parameters), while this server has no local
    copy to decide from: the start stops (one line, exit 2)."""


# libpq's words (its messages carry no SQLSTATE at connection time) for failures that
# waiting will not mend; anything else (refused, timed out, no route, no name resolution:
# a branch's link down) is taken as an outage.
_PERMANENT = (
    (
        ("database", "does not exist"),
        "create it, owned by FaceGate's role: createdb -O ROLE DATABASE",
    ),
    (("role", "does not exist"), "create the role (createuser), or name another in the URL"),
    (("authentication failed",), "check the user and password (or the password file)"),
    (("no password supplied",), "give the password (in a password file: PGPASSFILE)"),
    (("pg_hba.conf",), "allow this host and role in the PostgreSQL server's pg_hba.conf"),
    (("permission denied",), "GRANT CONNECT ON DATABASE to the role"),
    (("connection is bad",), "fix the connection parameters in the store's URL"),
    (("invalid",), "fix the connection parameters in the store's URL"),
    (("SSL was required",), "fix sslmode in the store's URL, or enable SSL on the server"),
)


def reach_store(url: str) -> tuple[str, str]:
    """Reach the shared store once, directly (the pool hides why it cannot connect), and
    bring its schema up to this FaceGate's (store/postgres.py: StoreSchemaError for a
    database that is not FaceGate's, a newer schema, a role without the rights). ("", "")
    when it is ready; else why not, in one line without the password, and, for a failure
    waiting will not mend, what to do ("" for an outage)."""
    import psycopg

    from facegate_server.errors import StoreUnavailable
    from facegate_server.store.postgres import PostgresStore, conninfo_with_defaults

    try:
        psycopg.connect(conninfo_with_defaults(url), autocommit=True).close()
    except psycopg.Error as error:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password") or ""
        why = " ".join(str(error).split()).removeprefix("connection failed: ")
        why = why.partition("FATAL: ")[2] or why  # the server's reason, without where
        if password:
            why = why.replace(str(password), "********")
        fix = next((fix for words, fix in _PERMANENT if all(w in why for w in words)), "")
        return why, fix
    try:
        PostgresStore(url, pool_size=1).close()  # migrates
    except StoreUnavailable as error:  # lost since: an outage
        return error.detail, ""
    return "", ""


def build_store(settings: Settings) -> Store:
    """The store the settings name: SQLite in data_dir, or the chain's: the shared
    PostgreSQL and this server's local copy of the gallery in data_dir. The chain's store
    is reached first: StoreSchemaError for a database FaceGate cannot use, StoreRefused
    when it cannot be reached for good and there is no local copy to decide from."""
    if not settings.store:
        return SqliteStore(settings.db_path, purge_interval=settings.purge_interval_s)
    from facegate_server.datadir import copy_made
    from facegate_server.store import replica
    from facegate_server.store.chain import ChainStore
    from facegate_server.store.postgres import describe

    why, fix = reach_store(settings.store)
    if fix and not copy_made(settings.data_dir):
        raise StoreRefused(
            f"the store {describe(settings.store)} cannot be used: {why}: {fix}; this server"
            " has no local copy of the gallery yet, so it cannot start without it"
        )
    return ChainStore(
        settings.store,
        settings.data_dir / replica.COPY_FILE,
        event_wait=settings.store_event_wait_s,
    )


def cannot_decide(state: StoreState) -> str:
    """Why a chain server cannot decide at all: it has never reached its store, so it has
    no local copy of the gallery (every face would be a stranger); "" when it has one, or
    when the store is the server's own."""
    if state.kind == "local" or state.copy_current is not None:
        return ""
    why = " ".join(state.last_error.split())
    return (
        f"this server has never reached its store {state.name} and has no local copy of"
        " the gallery: it cannot decide until it does" + (f" ({why})" if why else "")
    )


class UntilCopied:
    """The engine of a chain server started with no local copy of the gallery: Identify,
    Verify and SearchFaces are refused (UNAVAILABLE, NO_GALLERY_COPY) until the first copy
    is made, rather than denying every member as a stranger. Everything else is the
    wrapped engine's (the router)."""

    def __init__(self, engine: RecognitionEngine, store: Store) -> None:
        self.engine = engine
        self._store = store
        self._copied = False  # once made, a copy is never unmade

    def _check(self) -> None:
        if self._copied:
            return
        why = cannot_decide(self._store.state())
        if why:
            raise RecognitionUnavailable(why, reason="NO_GALLERY_COPY")
        self._copied = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    @property
    def kind(self) -> EngineKind:
        return self.engine.kind

    @property
    def name(self) -> str:
        return self.engine.name

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self._check()
        return self.engine.identify(image, timeout, attempt)

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        self._check()
        return self.engine.verify(member_id, image, timeout, attempt)

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        self._check()
        return self.engine.search(image, timeout, max_candidates)

    def enrol(
        self, photos: Sequence[bytes], timeout: float, templates: Sequence[FaceTemplate]
    ) -> list[FaceTemplate]:
        return self.engine.enrol(photos, timeout, templates)

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        self.engine.enrolled(member_id, templates)

    def removed(self, member_id: str) -> None:
        self.engine.removed(member_id)

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        self.engine.template_removed(member_id, template)

    def knows(self, member_id: str) -> bool:
        return self.engine.knows(member_id)

    def close(self) -> None:
        self.engine.close()


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
    certificates = tls.Certificates.load(
        settings.tls_cert, settings.tls_key, settings.tls_client_ca
    )
    credentials = None if certificates is None else certificates.credentials
    # Health needs no credentials, unless probes have a listener of their own
    # (FACEGATE_HEALTH_LISTEN): then health here is for known callers.
    authenticator = auth.Authenticator(
        callers, frozenset() if settings.health_listen else auth.NO_CREDENTIALS_NEEDED
    )
    # The store's files are measured for the metrics when the store is the settings' own.
    store_files = sqlite_files(settings.db_path) if store is None and not settings.store else ()
    store = store if store is not None else build_store(settings)
    router: RecognitionEngine | None = None
    metrics_server: MetricsServer | None = None
    try:
        local = engine if engine is not None else build_local(settings, store)
        router, replayer, engine_status = build_engine(settings, store, local, clock)
        follow = getattr(store, "follow", None)
        if follow is not None:  # the chain: the engines follow the shared change log
            follow(router)
        if cannot_decide(store.state()):  # a chain server that never reached its store
            router = UntilCopied(router, store)
        refusals = Refusals()
        metrics = Metrics()
        bell = EventBell()
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
            event_retention_days=settings.event_retention_days,
            on_event=metrics.observe,
            events=bell,
        )
        metrics.watch(gate.status, store_files)
        if settings.metrics_listen:
            metrics_server = MetricsServer(settings.metrics_listen, metrics.registry)
        feed = EventFeed(
            store, bell, max_followers=settings.max_followers, poll=settings.follow_poll_s
        )
        servicer = FaceGateServicer(gate, feed)
        door = max(8, 4 * settings.workers)  # Identify and Verify's own threads
        rpc = RpcServer(
            listen=settings.listen,
            credentials=credentials,
            register=lambda server: pb_grpc.add_FaceGateServiceServicer_to_server(servicer, server),
            service_names=(SERVICE_NAME,),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ],
            interceptors=[
                metrics.interceptor(),  # outermost: it counts the calls the others refuse
                # authentication before rate limits: rate limits are per admitted caller
                auth.AuthInterceptor(authenticator, refusals),
                ratelimit.interceptor(
                    (settings.identify_rate, settings.identify_burst),
                    (settings.enroll_rate, settings.enroll_burst),
                    clock,
                    refusals,
                    follow=(settings.follow_rate, settings.follow_burst),
                ),
            ],
            lanes=[
                Lane("door", DOOR_METHODS, threads=door, queue=2 * door),
                Lane("photo", PHOTO_METHODS, threads=4, queue=12),
            ],
            threads=4,  # every other method: quick reads and changes of the store
            queue=12,
            refusals=refusals,
            on_unserved=servicer.unserved,
            message_limits=frame_limits(settings.max_image_bytes),
            health_listen=settings.health_listen,
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
        for finding in startup_findings(settings, callers):
            log.warning(finding.message, extra=finding.log_fields())
    except BaseException:
        if metrics_server is not None:
            metrics_server.stop()
        if router is not None:
            router.close()
        store.close()
        raise
    if rpc.port == 0:
        if metrics_server is not None:
            metrics_server.stop()
        rpc.stop(0)
        feed.shutdown()
        router.close()
        store.close()
        raise OSError(f"could not listen on {settings.listen}")
    if metrics_server is not None:
        log.info("metrics", extra={"listen": settings.metrics_listen, "port": metrics_server.port})
        if not auth.is_loopback(settings.metrics_listen):
            log.warning(
                f"metrics are served without authentication on {settings.metrics_listen}: "
                "anyone who can reach it reads the member count and the decisions' figures"
            )
    return FaceGateServer(
        rpc,
        rpc.port,
        gate,
        store,
        settings=settings,
        authenticator=authenticator,
        certificates=certificates,
        retention=Retention(
            store,
            settings.event_retention_days,
            clock=wall_clock,
            interval=settings.retention_interval_s,
            # A chain: one server deletes for all (the holder of a lease in its database).
            lease=chain_lease(
                settings.store, settings.event_retention_days, settings.retention_interval_s
            ),
        ),
        metrics=metrics_server,
        feed=feed,
    )
