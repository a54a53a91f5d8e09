"""The gRPC server: grpc.aio on an event loop in a thread of its own, driven by sync methods.

Why grpc.aio (measured by `benchmarks/server_model.py`; figures in benchmarks/README.md):
with the same 8 threads for the synchronous handlers both models answer as fast, but in
the sync server every open server-streaming call holds one of those threads for its life
(50 idle streams: no Identify answered at all), and a refusal decided in an interceptor
still waits for a free thread to be sent. Here streams, health, reflection, and every
refusal (authentication, rate limits, a full server) are coroutines on the loop, and
take no thread.

How a call goes:
1. It arrives on the loop. `Dispatcher` stamps its arrival (`time.monotonic()`); the
   interceptors (authentication, then rate limits) admit or refuse it there.
2. FaceGate's servicer is synchronous (the Gate blocks on recognition workers, SQLite and
   the cloud), so each of its calls runs on a pool of `threads` threads. At most
   `threads + queue` such calls are in the server, running or waiting for a thread; the
   next one is refused at once with RESOURCE_EXHAUSTED, reason SERVER_BUSY, and a RetryInfo.
   A call whose caller has gone (deadline, cancel) before a thread took it never starts.
3. In the thread, `arrival()` is when the call arrived: the Identify budget starts there,
   not when a thread became free.
4. The call carries a `Ticket` (engines/admission.py) to the recognition queue: its caller
   (the authenticated name; on an open server, the peer and its turnstile id) for fairness, and an
   event set when the call ends, so that images it queued are never started for nobody.
   An Identify refused here for load still gets its access event (`on_busy`).

New methods that wait long (the operations issue's live events, the chain's change feeds)
are written as asyncio handlers (`async def`, async generators): they run on the loop and
hold no thread. Nothing on the loop may block: blocking work goes to a thread pool.
With 2 recognition workers app.py makes 8 threads and a queue of 16 (24 calls at most).

Tests and the entry point see only sync methods: `start()`, `stop(grace)` (health
NOT_SERVING first, then `grace` seconds for the calls in flight), `port`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent import futures
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facegate_server.engines import admission
from facegate_server.engines.admission import Ticket
from facegate_server.errors import FaceGateError, RateLimited
from facegate_server.rpc import tls
from facegate_server.rpc.auth import current_caller
from facegate_server.rpc.intercept import Refusals, peer_host, refuse

log = logging.getLogger(__name__)

T = TypeVar("T")

OnBusy = Callable[[str, Any, FaceGateError], None]
"""Told (in a thread, with the call's context) of each call refused because the server is
full: (full method, request, error). The servicer writes refused Identify calls to the
access log."""

_arrival: ContextVar[float | None] = ContextVar("facegate_arrival", default=None)


def arrival() -> float | None:
    """When the call this thread serves arrived (`time.monotonic()`); None outside a call."""
    return _arrival.get()


class ServerBusy(RateLimited):
    """Every thread is busy and `queue` calls already wait for one."""

    reason = "SERVER_BUSY"


class _Aborted(Exception):
    """A synchronous handler's abort, carried back to the loop to be sent there."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details, self.trailing_metadata = code, details, ()


class ThreadContext:
    """The context a synchronous handler gets in its thread: what it reads of the call,
    taken on the loop before the thread started (aio objects stay on the loop's thread)."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._peer = context.peer()
        self._auth_context = context.auth_context()
        self._metadata = context.invocation_metadata()
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> Mapping[str, Any]:
        return self._auth_context

    def invocation_metadata(self) -> Any:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise _Aborted(status)

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Aborted(_Status(code, details))


class Slots:
    """How many synchronous calls are in the server (running or waiting for a thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    def take(self) -> bool:
        with self._changed:
            if self.used >= self.limit:
                return False
            self.used += 1
            self._changed.notify_all()
            return True

    def give(self) -> None:
        with self._changed:
            self.used -= 1
            self._changed.notify_all()

    def wait_for(self, used: int, timeout: float) -> bool:
        """Wait until exactly `used` slots are taken (for status and tests); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.used == used, timeout)


class Dispatcher(grpc.aio.ServerInterceptor):
    """The innermost interceptor: runs synchronous unary handlers on the thread pool, within
    the bound, with the call's arrival time; asyncio handlers run as they are."""

    def __init__(
        self,
        pool: futures.ThreadPoolExecutor,
        threads: int,
        slots: Slots,
        retry_after: float,
        refusals: Refusals | None = None,
        on_busy: OnBusy | None = None,
    ) -> None:
        self.pool, self.threads = pool, threads
        self.slots = slots
        self.retry_after = retry_after
        self.refusals = refusals
        self.on_busy = on_busy

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        arrived = time.monotonic()
        handler = await continuation(handler_call_details)
        behaviour = None if handler is None else handler.unary_unary
        if handler is None or behaviour is None or inspect.iscoroutinefunction(behaviour):
            return handler
        full_method = handler_call_details.method
        pool, threads, slots, retry_after = self.pool, self.threads, self.slots, self.retry_after
        refusals, on_busy = self.refusals, self.on_busy

        async def dispatched(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            caller = current_caller()
            if caller is None or caller.via == "open":
                # Nobody is authenticated: the peer host and the turnstile it names (channels
                # to one target in one process share a connection, so a peer alone would
                # make one caller of every turnstile a process drives).
                named = getattr(request, "turnstile_id", "")
                ticket = Ticket(f"{peer_host(context)}/{named}" if named else context.peer())
            else:
                ticket = Ticket(caller.name)
            if not slots.take():
                busy = ServerBusy(
                    f"the server is busy: {slots.limit} calls are already in it, running or "
                    f"waiting for one of its {threads} threads; retry shortly",
                    retry_delay=retry_after,
                    metadata={"in_server": str(slots.limit)},
                )
                if on_busy is not None:  # the access log, off the loop (SQLite blocks)
                    refused = contextvars.copy_context()
                    asyncio.get_running_loop().run_in_executor(
                        None, refused.run, on_busy, full_method, request, busy
                    )
                await refuse(context, full_method, busy, time.perf_counter(), refusals)
            token = _arrival.set(arrived)
            holder = admission.set_ticket_token(ticket)
            try:
                call = contextvars.copy_context()  # the caller (auth), arrival and ticket
            finally:
                admission.reset_ticket(holder)
                _arrival.reset(token)
            try:
                in_thread = cast(grpc.ServicerContext, ThreadContext(context))
                job = pool.submit(call.run, behaviour, request, in_thread)
            except RuntimeError:  # the pool is shut down: the server is stopping
                slots.give()
                raise
            job.add_done_callback(lambda _: slots.give())  # when it ends, or never starts
            try:
                return await asyncio.wrap_future(job)  # cancelled: cancels a job not started
            except _Aborted as aborted:
                await context.abort_with_status(aborted.status)
            finally:
                ticket.gone.set()  # answered or abandoned: its queued images are for nobody

        return grpc.unary_unary_rpc_method_handler(
            dispatched, handler.request_deserializer, handler.response_serializer
        )


class RpcServer:
    """A grpc.aio server with its event loop in its own thread, its thread pool for
    synchronous handlers, health and reflection; bound to `listen` when built."""

    def __init__(
        self,
        *,
        listen: str,
        credentials: grpc.ServerCredentials | None,
        register: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        threads: int = 8,
        queue: int = 16,
        retry_after: float = 0.5,
        refusals: Refusals | None = None,
        on_busy: OnBusy | None = None,
    ) -> None:
        """`register` adds the servicers; `service_names` get health statuses (and "")."""
        self.threads, self.queue = threads, queue
        self.refusals = refusals if refusals is not None else Refusals()
        self.service_names = ("", *service_names)
        self.pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="facegate-rpc")
        self.slots = Slots(threads + queue)
        self.health = health.aio.HealthServicer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="facegate-grpc", daemon=True
        )
        self._thread.start()
        dispatcher = Dispatcher(self.pool, threads, self.slots, retry_after, self.refusals, on_busy)
        try:
            self._server, self.port = self._run(
                self._build(listen, credentials, register, [*interceptors, dispatcher], options)
            )
        except BaseException:
            self._close()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _build(
        self,
        listen: str,
        credentials: grpc.ServerCredentials | None,
        register: Callable[[grpc.aio.Server], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        options: Sequence[tuple[str, Any]],
    ) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=interceptors, options=options)
        try:
            register(server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            for service in self.service_names:
                await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            reflection.enable_server_reflection(
                (*self.service_names[1:], health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            port = tls.bind(server, listen, credentials)
        except BaseException:
            await server.stop(None)
            raise
        return server, port

    def start(self) -> None:
        """Accept calls; health SERVING."""

        async def start() -> None:
            await self._server.start()
            for service in self.service_names:
                await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

        self._run(start())

    def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING for every service (from any thread)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def change() -> None:
            for service in self.service_names:
                await self.health.set(service, status)

        if self._thread.is_alive():
            self._run(change())

    def set_health(self, service: str, serving: bool) -> None:
        """Health SERVING or NOT_SERVING for one more `service` name (from any thread):
        a part of the server that the overall status does not follow (the shared store)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if self._thread.is_alive():
            self._run(self.health.set(service, status))

    def stop(self, grace: float) -> None:
        """Health NOT_SERVING, no new calls; calls in flight have `grace` seconds; release all."""

        async def stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)

        try:
            if self._thread.is_alive():
                self._run(stop())
        finally:
            self._close()

    def _close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
