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
   interceptors (authentication, then rate limits) admit or refuse it there, before its
   request message is received (see `Dispatcher`): a refusal costs no message's memory.
2. FaceGate's servicer is synchronous (the Gate blocks on recognition workers, SQLite and
   the cloud), so each of its calls runs on a pool of `threads` threads. At most
   `threads + queue` such calls are in the server, running or waiting for a thread; the
   next one is refused at once with RESOURCE_EXHAUSTED, reason SERVER_BUSY, and a RetryInfo.
   A `Lane` sets methods apart with threads and a bound of their own: app.py gives the
   door's (Identify, Verify) one, so that no number of slow administrative calls (a
   burst of GetStatus while the shared store does not answer) holds a thread a turnstile
   needs, and the photo methods another, so that enrolments of large photos hold none
   that a suspension or a deletion needs.
   A call whose caller has gone (deadline, cancel) before a thread took it never starts.
3. In the thread, `arrival()` is when the call arrived: the Identify budget starts there,
   not when a thread became free.
4. The call carries a `Ticket` (engines/admission.py) to the recognition queue: its caller
   (the authenticated name; on an open server, the peer and its turnstile id) for fairness, and an
   event set when the call ends, so that images it queued are never started for nobody.
   An Identify or a Verify refused here for load, or whose caller left before a thread
   took it, still gets its access event (`on_unserved`).

New methods that wait long (the operations issue's live events, the chain's change feeds)
are written as asyncio handlers (`async def`, async generators): they run on the loop and
hold no thread. Nothing on the loop may block: blocking work goes to a thread pool.
With 2 recognition workers app.py gives the door 8 threads and a queue of 16 (24 calls
at most), the photo methods (Enroll, AddMemberPhotos, SearchFaces) 4 threads and a queue
of 12, and every other method as many.

Tests and the entry point see only sync methods: `start()`, `stop(grace)` (health
NOT_SERVING first, then `grace` seconds for the calls in flight, then at most STOP_WAIT_S
for the access events they still write), `port`.
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
from typing import Any, NamedTuple, NoReturn, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facegate_server.engines import admission
from facegate_server.engines.admission import Ticket
from facegate_server.errors import (
    FaceGateError,
    InvalidArgument,
    RateLimited,
    RecognitionTimeout,
    ServerStopping,
)
from facegate_server.rpc import tls
from facegate_server.rpc.auth import current_caller
from facegate_server.rpc.intercept import Refusals, method_name, peer_host, refuse

log = logging.getLogger(__name__)

T = TypeVar("T")

OnUnserved = Callable[[str, Any, FaceGateError, float], None]
"""Told (in a thread, with the call's context) of each call that no thread served: refused
because its lane was full, or whose caller left (deadline, cancel) while it waited for a
thread: (full method, request, error, seconds since it arrived). The servicer writes such
Identify and Verify calls to the access log."""


class Lane(NamedTuple):
    """Methods (full names) set apart with `threads` threads and a `queue` of their own:
    calls to other methods, however many or slow, never hold these threads or fill this
    queue, nor the other way round."""

    name: str
    methods: frozenset[str]
    threads: int
    queue: int


class _Pool:
    """A lane's threads and the bound on its calls in the server."""

    def __init__(self, name: str, threads: int, queue: int) -> None:
        self.name, self.threads = name, threads
        self.executor = futures.ThreadPoolExecutor(
            threads, thread_name_prefix=f"facegate-{name or 'rpc'}"
        )
        self.calls = f"{name} calls" if name else "calls"  # for messages
        self.slots = Slots(threads + queue)


_arrival: ContextVar[float | None] = ContextVar("facegate_arrival", default=None)


def arrival() -> float | None:
    """When the call this thread serves arrived (`time.monotonic()`); None outside a call."""
    return _arrival.get()


class ServerBusy(RateLimited):
    """Every thread of the call's lane is busy and its `queue` calls already wait for one."""

    reason = "SERVER_BUSY"


class CallAbandoned(RecognitionTimeout):
    """The caller left while its call waited for a thread: nothing was decided."""

    reason = "CALL_ABANDONED"


def since(moment: float) -> float:
    """Seconds since `moment` (`time.monotonic()`)."""
    return time.monotonic() - moment


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
    """The innermost interceptor: receives each unary call's request message only once the
    outer interceptors have admitted the call, then runs synchronous handlers on the
    thread pool, within the bound, with the call's arrival time (asyncio handlers run on
    the loop as they are).

    Receiving after admission: a unary method's handler would get its message whole, and
    gRPC receives it (up to the server-wide limit, which fits an Enroll of the most photos)
    before any behaviour runs, so before authentication. Here every unary-request method is
    served as a request-streaming one (the same bytes on the wire: clients see no
    difference) whose behaviour reads its one message itself, inside the interceptors'
    guards: a call refused there has sent only what HTTP/2 flow control let through (under
    1 MiB measured, benchmarks/prelimit.py). Server-streaming asyncio methods alike. A
    method of `message_limits` is refused (INVALID_ARGUMENT, as its limit says) when its
    message is larger than its limit, before it is parsed."""

    def __init__(
        self,
        pools: Mapping[str, _Pool],
        default: _Pool,
        retry_after: float,
        refusals: Refusals | None = None,
        on_unserved: OnUnserved | None = None,
        message_limits: Mapping[str, MessageLimit] | None = None,
    ) -> None:
        """`pools`: full method -> its lane's pool; every other method uses `default`."""
        self.pools, self.default = dict(pools), default
        self.retry_after = retry_after
        self.refusals = refusals
        self.on_unserved = on_unserved
        self.message_limits = dict(message_limits or {})
        self.stopping = False  # set on the loop when the server stops
        self.waiting: set[asyncio.Future[Any]] = set()  # calls waiting for their thread
        self.jobs: set[futures.Future[Any]] = set()  # submitted to a thread, not ended
        self.telling: set[asyncio.Future[None]] = set()  # on_unserved calls not yet done

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        arrived = time.monotonic()
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        receive = _Receiver(
            full_method,
            handler.request_deserializer,
            self.message_limits.get(full_method),
            self.refusals,
        )
        if handler.unary_stream is not None:
            return _streamed(handler, receive)
        behaviour = handler.unary_unary
        if behaviour is None:
            return handler
        if inspect.iscoroutinefunction(behaviour):
            asynchronous = cast(Callable[..., Awaitable[Any]], behaviour)

            async def received(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                return await asynchronous(await receive(context), context)

            return grpc.stream_unary_rpc_method_handler(received, None, handler.response_serializer)
        lane = self.pools.get(full_method, self.default)
        pool, threads, slots = lane.executor, lane.threads, lane.slots
        retry_after, refusals, on_unserved = self.retry_after, self.refusals, self.on_unserved
        waiting, telling, jobs = self.waiting, self.telling, self.jobs

        def unserved(request: Any, error: FaceGateError) -> None:
            """Tell `on_unserved`, off the loop (the access log blocks), in the call's
            context; a stopping server waits for it before it returns (and the store closes)."""
            if on_unserved is None:
                return
            told = contextvars.copy_context()
            try:
                future = asyncio.get_running_loop().run_in_executor(
                    None, told.run, on_unserved, full_method, request, error, since(arrived)
                )
            except RuntimeError:  # the loop's executor is shut down: the server is stopping
                log.warning("a %s that no thread served was not logged", full_method)
                return
            telling.add(future)
            future.add_done_callback(telling.discard)

        async def dispatched(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request = await receive(context)
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
                    f"the server is busy: {slots.limit} {lane.calls} are already in it, running "
                    f"or waiting for one of the {threads} threads it keeps for them; retry shortly",
                    retry_delay=retry_after,
                    metadata={
                        "in_server": str(slots.limit),
                        **({"lane": lane.name} if lane.name else {}),
                    },
                )
                unserved(request, busy)
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
            jobs.add(job)

            def ended(job: futures.Future[Any]) -> None:  # when it ends, or never starts
                slots.give()
                jobs.discard(job)

            job.add_done_callback(ended)
            running = asyncio.current_task()
            if running is not None:
                waiting.add(running)
            try:
                return await asyncio.wrap_future(job)  # cancelled: cancels a job not started
            except _Aborted as aborted:
                await context.abort_with_status(aborted.status)
            except asyncio.CancelledError:
                if job.cancelled():  # no thread took it: the servicer never saw it
                    remaining = context.time_remaining()
                    left = remaining is not None and remaining <= 0  # its deadline passed
                    unserved(
                        request,
                        ServerStopping(
                            "the server stopped before one of its threads could take the call"
                        )
                        if self.stopping and not left
                        else CallAbandoned(
                            f"the caller left (deadline or cancel) after {since(arrived):.3f} s, "
                            f"while it waited for one of the {threads} threads for {lane.calls}"
                        ),
                    )
                raise
            finally:
                if running is not None:
                    waiting.discard(running)
                ticket.gone.set()  # answered or abandoned: its queued images are for nobody

        return grpc.stream_unary_rpc_method_handler(dispatched, None, handler.response_serializer)


STOP_WAIT_S = 10.0
"""How long a stopping server waits, after its grace, for what its calls still write."""

PROBE_BYTES = 4096
"""The health listener's receive limit: a HealthCheckRequest is a service name."""


def _streamed(
    handler: grpc.RpcMethodHandler[Any, Any], receive: _Receiver
) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming method served as a bidirectional one that reads its one message
    after admission (an asyncio behaviour: health's Watch, the long waits of the docstring);
    a synchronous one is left as it is."""
    behaviour = handler.unary_stream
    if inspect.isasyncgenfunction(behaviour):
        generator = behaviour

        async def yielded(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for response in generator(await receive(context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(yielded, None, handler.response_serializer)
    if inspect.iscoroutinefunction(behaviour):  # writes with context.write
        writer = cast(Callable[..., Awaitable[Any]], behaviour)

        async def written(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await writer(await receive(context), context)

        return grpc.stream_stream_rpc_method_handler(written, None, handler.response_serializer)
    return handler


class MessageLimit(NamedTuple):
    """The largest request message a method takes; a larger one is refused
    INVALID_ARGUMENT naming `field` (what makes it large) with `reason`, and `why`."""

    bytes: int
    field: str
    reason: str
    why: str


class _Receiver:
    """Reads a unary call's one request message (raw bytes: the method has no
    deserializer, so its size is checked before it is parsed) and parses it."""

    def __init__(
        self,
        full_method: str,
        deserializer: Callable[[bytes], Any] | None,
        limit: MessageLimit | None,
        refusals: Refusals | None,
    ) -> None:
        self.full_method, self.deserializer, self.refusals = full_method, deserializer, refusals
        self.limit = limit

    async def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.perf_counter()
        raw = await context.read()
        method = method_name(self.full_method)
        if raw is grpc.aio.EOF:
            error: FaceGateError = InvalidArgument(
                "request", f"{method} takes one request message; none was sent", reason="EMPTY"
            )
            await refuse(context, self.full_method, error, started, self.refusals)
        raw = cast(bytes, raw)
        limit = self.limit
        if limit is not None and len(raw) > limit.bytes:
            error = InvalidArgument(
                limit.field,
                f"the {method} request message is {len(raw)} bytes; {method} takes at most "
                f"{limit.bytes} bytes ({limit.why})",
                reason=limit.reason,
            )
            await refuse(context, self.full_method, error, started, self.refusals)
        if self.deserializer is None:
            return raw
        try:
            return self.deserializer(raw)
        except Exception:  # protobuf's DecodeError, or whatever a deserializer raises
            error = InvalidArgument(
                "request", f"the {method} request message could not be parsed", reason="MALFORMED"
            )
            await refuse(context, self.full_method, error, started, self.refusals)


PING_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 250),
    ("grpc.http2.max_ping_strikes", 0),
)
"""Clients may ping every 250 ms, with or without calls: a turnstile pointed at several
servers finds a frozen one by its unanswered ping (facegate_client's KEEPALIVE_MS)."""


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
        lanes: Sequence[Lane] = (),
        retry_after: float = 0.5,
        refusals: Refusals | None = None,
        on_unserved: OnUnserved | None = None,
        message_limits: Mapping[str, MessageLimit] | None = None,
        health_listen: str = "",
    ) -> None:
        """`register` adds the servicers; `service_names` get health statuses (and "");
        `threads` and `queue`: for the methods no `lanes` entry sets apart;
        `message_limits`: full method -> the largest request message it takes, below the
        server-wide grpc.max_receive_message_length of `options`; `health_listen`: where to
        serve health alone as well (plaintext; `health_port` is its port)."""
        self.threads, self.queue = threads, queue
        self.refusals = refusals if refusals is not None else Refusals()
        self.service_names = ("", *service_names)
        default = _Pool("other" if lanes else "", threads, queue)
        self.slots = default.slots
        self.lanes = {lane.name: _Pool(lane.name, lane.threads, lane.queue) for lane in lanes}
        self._pools = [default, *self.lanes.values()]
        self.health = health.aio.HealthServicer()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="facegate-grpc", daemon=True
        )
        self._thread.start()
        self._dispatcher = dispatcher = Dispatcher(
            {method: self.lanes[lane.name] for lane in lanes for method in lane.methods},
            default,
            retry_after,
            self.refusals,
            on_unserved,
            message_limits,
        )
        self._probes: grpc.aio.Server | None = None
        self.health_port = 0
        try:
            self._server, self.port = self._run(
                self._build(listen, credentials, register, [*interceptors, dispatcher], options)
            )
            if health_listen:
                try:
                    self._probes, self.health_port = self._run(self._build_probes(health_listen))
                except BaseException:
                    self._run(self._server.stop(None))
                    raise
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
        server = grpc.aio.server(interceptors=interceptors, options=[*PING_OPTIONS, *options])
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

    async def _build_probes(self, listen: str) -> tuple[grpc.aio.Server, int]:
        """A server of the health service alone (the same statuses), plaintext: probes carry
        neither tokens nor client certificates. Its receive limit fits a service name and
        nothing else: gRPC refuses a larger message from its 5-byte prefix, before receiving
        it, so a probe listener costs no memory whatever is sent to it."""
        probes = grpc.aio.server(options=[("grpc.max_receive_message_length", PROBE_BYTES)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, probes)
        try:
            port = probes.add_insecure_port(listen)
        except RuntimeError:
            port = 0
        if port == 0:
            await probes.stop(None)
            raise OSError(f"could not listen for health probes on {listen}")
        return probes, port

    def start(self) -> None:
        """Accept calls; health SERVING."""

        async def start() -> None:
            if self._probes is not None:
                await self._probes.start()
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
            self._dispatcher.stopping = True
            await self._server.stop(grace)
            if self._probes is not None:
                await self._probes.stop(None)
            # What the calls still in the server write (their access events) lands before
            # this returns and the store closes: the calls cancelled at the grace's end,
            # those still running in a thread (their caller has its answer: UNAVAILABLE),
            # then the events of the calls no thread took. At most STOP_WAIT_S in all.
            dispatcher, end = self._dispatcher, time.monotonic() + STOP_WAIT_S
            if dispatcher.waiting:
                await asyncio.wait(set(dispatcher.waiting), timeout=STOP_WAIT_S)
            running = set(dispatcher.jobs)
            if running:
                await asyncio.get_running_loop().run_in_executor(
                    None, futures.wait, running, max(0.0, end - time.monotonic())
                )
            if dispatcher.telling:
                await asyncio.wait(
                    set(dispatcher.telling), timeout=max(0.01, end - time.monotonic())
                )

        try:
            if self._thread.is_alive():
                self._run(stop())
        finally:
            self._close()

    def _close(self) -> None:
        for pool in self._pools:
            pool.executor.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
