"""Metrics in the Prometheus exposition format, on a listen address of their own
(FACEGATE_METRICS_LISTEN, `facegate serve --metrics-listen`; off by default).

Each server has its own `CollectorRegistry` (never prometheus_client's global one), so
several servers in one process (tests) keep their figures apart. Two kinds of metric:
- events, counted where they happen: the Identify and Verify latency histograms and the
  engines' outcomes (from each access event the gate writes: `Metrics.observe`), and gRPC
  calls by method and code (`CallCounter`, the outermost interceptor: refusals count too);
- state, read at scrape time from what GetStatus already reports (`StatusCollector` reads
  `Gate.status()`): the circuit breaker, the outbox, the cloud's transactions, the
  recognition workers and queue, and the size of the SQLite files. Nothing is kept twice.

The README's Metrics section lists every metric with its labels.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from facegate_server.domain import AccessEvent, AccessKind, EngineOutcome, Status
from facegate_server.rpc.intercept import guard_behaviour, method_name

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 5.0)
"""Seconds. Dense below the 1.2 s Identify budget (a local decision takes ~0.14 s on 2
cores, a cloud one ~0.45 s), a bucket at the budget itself, and a few beyond it for calls
that overran (queued behind others, or a slow store)."""


class Metrics:
    """One server's metrics registry and the instruments events update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("engine", "decision")
        self.identify = Histogram(
            "facegate_identify_duration_seconds",
            "Identify calls from arrival to the logged decision, by deciding engine and decision",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.verify = Histogram(
            "facegate_verify_duration_seconds",
            "Verify calls from arrival to the logged decision, by deciding engine and decision",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "facegate_engine_outcomes",
            "What each engine did for a frame (Identify and Verify), by kind, engine and outcome",
            ("kind", "engine", "outcome"),
            registry=self.registry,
        )
        self.calls = Counter(
            "facegate_grpc_calls",
            "gRPC calls answered, by method and status code (refusals included)",
            ("method", "code"),
            registry=self.registry,
        )

    def observe(self, event: AccessEvent) -> None:
        """Count one Identify or Verify the gate logged (the gate's one place for events)."""
        histogram = self.verify if event.kind is AccessKind.VERIFY else self.identify
        engine = event.engine.value.lower()
        histogram.labels(engine, event.decision.value).observe(event.latency.total_seconds())
        kind = event.kind.value.lower()
        for report in event.reports:
            self.outcomes.labels(kind, report.engine.value.lower(), report.outcome.value).inc()
        if not event.reports and not event.decision.value.startswith("NOT_DECIDED"):
            # One engine alone (local-only): the events carry no reports; it decided.
            self.outcomes.labels(kind, engine, EngineOutcome.DECIDED.value).inc()

    def watch(self, status: Callable[[], Status], store_files: Sequence[Path] = ()) -> None:
        """Read the server's state at each scrape (`status`: Gate.status)."""
        self.registry.register(StatusCollector(status, store_files))

    def interceptor(self) -> CallCounter:
        return CallCounter(self.calls)


class StatusCollector(Collector):
    """The state GetStatus reports, as Prometheus metrics, read when scraped."""

    def __init__(self, status: Callable[[], Status], store_files: Sequence[Path] = ()) -> None:
        self._status = status
        self._store_files = tuple(store_files)

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        engines = status.engines
        if engines.circuit != "disabled":  # the cloud's breaker, when the cloud is configured
            circuit = GaugeMetricFamily(
                "facegate_circuit_breaker_state",
                "The circuit breaker in front of an engine: 1 for its current state",
                labels=("engine", "state"),
            )
            for state in ("closed", "open", "half-open"):
                circuit.add_metric(("azure", state), float(engines.circuit == state))
            yield circuit
        if not status.shared_figures_unknown:  # absent while the chain's store is away
            yield GaugeMetricFamily(
                "facegate_outbox_entries",
                "Changes of membership waiting to be replayed to the cloud (set-aside ones"
                " excluded)",
                value=status.outbox_depth,
            )
            yield GaugeMetricFamily(
                "facegate_outbox_parked_entries",
                "Outbox entries set aside after repeated failures (facegate sync --retry-parked)",
                value=status.outbox_parked,
            )
        transactions = CounterMetricFamily(
            "facegate_cloud_transactions",
            "Billable Face API calls since the server started, by operation",
            labels=("operation",),
        )
        for operation, count in sorted(engines.cloud_transactions.items()):
            transactions.add_metric((operation,), count)
        yield transactions
        restarts = CounterMetricFamily(
            "facegate_worker_restarts",
            "Recognition workers replaced (dead or hung) since the server started, by slot",
            labels=("slot",),
        )
        workers = GaugeMetricFamily(
            "facegate_workers",
            "Recognition worker slots by state (starting, idle, busy, stopped)",
            labels=("state",),
        )
        states = dict.fromkeys(("starting", "idle", "busy", "stopped"), 0)
        for worker in engines.workers:
            restarts.add_metric((str(worker.slot),), worker.restarts)
            states[worker.state] = states.get(worker.state, 0) + 1
        for state, count in states.items():
            workers.add_metric((state,), count)
        yield restarts
        yield workers
        yield GaugeMetricFamily(
            "facegate_recognition_queue_depth",
            "Images waiting for a recognition worker (the admission queue)",
            value=engines.recognition_queue,
        )
        admissions = CounterMetricFamily(
            "facegate_recognition_admissions",
            "The recognition queue's decisions since the server started, by outcome",
            labels=("outcome",),
        )
        for outcome, count in sorted(engines.admission.items()):
            admissions.add_metric((outcome,), count)
        yield admissions
        yield GaugeMetricFamily(
            "facegate_can_decide",
            "1 while a recognition worker runs or the cloud is reachable, else 0",
            value=float(engines.can_decide),
        )
        yield GaugeMetricFamily("facegate_members", "Enrolled members", value=status.member_count)
        if self._store_files:
            yield GaugeMetricFamily(
                "facegate_store_size_bytes",
                "Bytes of the SQLite store's files (database, write-ahead log, shared memory)",
                value=sum(_size(path) for path in self._store_files),
            )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # no write-ahead log at the moment
        return 0


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts every call to a known method by its status code, when it ends. Put first (the
    outermost interceptor), it counts the calls the others refuse as well."""

    def __init__(self, calls: Counter) -> None:
        self.calls = calls

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED, not counted by name
        method = method_name(handler_call_details.method)
        calls = self.calls

        @asynccontextmanager
        async def counted(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            try:
                yield
            except BaseException as error:
                # Aborted (the status is set on the context), cancelled, or failed.
                code = _code(context) or (
                    grpc.StatusCode.CANCELLED
                    if isinstance(error, (GeneratorExit, asyncio.CancelledError))
                    else grpc.StatusCode.UNKNOWN
                )
                calls.labels(method, code.name).inc()
                raise
            calls.labels(method, (_code(context) or grpc.StatusCode.OK).name).inc()

        return guard_behaviour(handler, counted)


def _code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    """The status code set on the call so far (by an abort or set_code), if any."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio may keep the raw number
        return next((c for c in grpc.StatusCode if c.value[0] == code), None)
    return None


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every few seconds)."""


class MetricsServer:
    """prometheus_client's WSGI app for one registry on `listen` (HOST:PORT; port 0 picks
    a free one): bound when built, served by a daemon thread from `start` to `stop`."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = split_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._httpd = make_server(
                host, port, make_wsgi_app(registry), Server, handler_class=_Quiet
            )
        except OSError as error:
            raise OSError(f"could not serve metrics on {listen}: {error.strerror}") from error
        self.port: int = self._httpd.server_port
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()


def split_listen(listen: str) -> tuple[str, int]:
    """`127.0.0.1:9464` -> ("127.0.0.1", 9464); `[::1]:9464` -> ("::1", 9464)."""
    host, _, port = listen.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)
