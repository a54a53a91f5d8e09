"""Building and running the emulator: two listeners on one event loop in its own thread.

- The **Face port** serves /face/v1.0 (the SDK's endpoint is `http://HOST:PORT`).
- The **admin port** serves /_emulator/... (fault modes, latency, request counts). It is
  a separate listener so that the `refuse` mode can close the Face port's socket while
  the admin side keeps answering.

`start_emulator(settings)` builds and starts both and returns a `RunningEmulator` with the
endpoints, an `admin` object (the same controls as the admin port, in Python) and
`stop()`. Everything runs on the emulator's own loop thread; recognition runs in worker
processes (see recognizer.py), so a call being recognised never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from facegate_azure_emulator import admin
from facegate_azure_emulator.errors import FaceApiError
from facegate_azure_emulator.face_api import FaceApi, Handler, error_response
from facegate_azure_emulator.faults import (
    PROFILES,
    FaultMode,
    FaultPicker,
    FaultSettings,
    LatencyProfile,
)
from facegate_azure_emulator.recognizer import Recognizer
from facegate_azure_emulator.state import FaceState, GroupKind, Limits

log = logging.getLogger("facegate.emulator")

T = TypeVar("T")

_DROP_WAIT_S = 30.0
"""After aborting a connection its handler is cancelled at once; this only bounds it."""


@dataclass(frozen=True)
class EmulatorSettings:
    """How to run one emulator. Only `key` has no default."""

    key: str
    listen: str = "127.0.0.1:0"
    """HOST:PORT of the Face API; port 0 picks a free one."""
    admin_listen: str = "127.0.0.1:0"
    """HOST:PORT of the admin API (no authentication: keep it on loopback)."""
    state_file: Path | None = None
    """Load state from here at start (if it exists) and save it here (atomically)."""
    latency: LatencyProfile = PROFILES["none"]
    faults: FaultSettings = field(default_factory=FaultSettings)
    training_seconds: float = 1.0
    training_queue_seconds: float = 0.0
    match_threshold: float = 0.6
    limits: Limits | None = None
    """Persons per group and faces per person; None: the tier's."""
    tier: str = "S0"
    """"S0" (10 calls a second, 1,000,000 persons a LargePersonGroup) or "F0" (20 calls a
    minute, 1,000 persons a group, 30,000 transactions a month)."""
    rate_per_second: float | None = None
    """Calls a second before 429s, on `clock`: None for the tier's, 0 for no limit."""
    throttle_form: str = "rate-limit-exceeded"
    """The 429's body: "rate-limit-exceeded", "status-code" or "code-429"."""
    retry_after_header: bool = True
    quota_remaining: int | None = None
    """Transactions left this month: None for the tier's (F0: 30,000; S0: no quota)."""
    limited_access: str = "granted"
    """"granted", "denied" (403 on the gated calls) or "no-face-id" (detect without faceId)."""
    limited_access_form: str = "inner-error"
    """The "denied" 403: "inner-error" (InvalidRequest + innererror) or "unsupported-feature"."""
    snapshot_keeps_deleted: bool = False
    """Whether persons deleted since the last training still come back from Identify."""
    small_faces: bool = True
    """Look for faces down to 36 pixels (an extra detection pass; see recognizer.py)."""
    seed: int = 0
    """Seeds the latency draws and the flap mode's choices."""
    workers: int = 1
    """Recognition processes; 0 runs recognition in a thread of this process."""
    clock: Callable[[], float] = time.time
    """Seconds since the epoch: faceId expiry, training times, dates in answers."""
    save_interval_seconds: float = 1.0


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Emulator:
    """The running emulator's insides. Its coroutines run on the emulator's loop only."""

    def __init__(self, settings: EmulatorSettings, recognizer: Recognizer) -> None:
        self.settings = settings
        self.state = FaceState(
            clock=settings.clock,
            training_seconds=settings.training_seconds,
            training_queue_seconds=settings.training_queue_seconds,
            match_threshold=settings.match_threshold,
        )
        self.state.snapshot_keeps_deleted = settings.snapshot_keeps_deleted
        if settings.state_file is not None and settings.state_file.exists():
            self.state.load_json(json.loads(settings.state_file.read_text(encoding="utf-8")))
        self._saved_version = self.state.version
        self.api = FaceApi(
            self.state,
            recognizer,
            settings.key,
            tier=settings.tier,
            rate_per_second=settings.rate_per_second,
            quota_remaining=settings.quota_remaining,
        )
        if settings.limits is not None:
            self.state.limits = settings.limits
        self.api.set_throttle(settings.throttle_form, settings.retry_after_header)
        self.api.set_limited_access(settings.limited_access, settings.limited_access_form)
        self.api.small_faces = settings.small_faces
        self.picker = FaultPicker(settings.faults, settings.latency, settings.seed)
        self.face_host, self.face_port = parse_address(settings.listen)
        self.admin_host, self.admin_port = parse_address(settings.admin_listen)
        self.received: Counter[str] = Counter()
        self.answered: defaultdict[str, Counter[int]] = defaultdict(Counter)
        self.dropped: Counter[str] = Counter()
        self.hung = 0
        self._stopping = False
        self._released: asyncio.Event | None = None
        self._hung_changed: asyncio.Event | None = None
        self._save_lock: asyncio.Lock | None = None
        self._saver: asyncio.Task[None] | None = None
        self._face_site: web.TCPSite | None = None
        self._face_runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None

    # ---- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._released = asyncio.Event()
        self._hung_changed = asyncio.Event()
        self._save_lock = asyncio.Lock()
        face_app = web.Application(
            middlewares=[self.faults, self.api.errors, self.api.auth, self.api.strict]
        )
        face_app.add_routes(self.api.routes())
        # handler_cancellation: a client that gives up (closes) cancels its request's task,
        # so hung requests do not pile up.
        self._face_runner = web.AppRunner(
            face_app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._face_runner.setup()
        await self._open_face_port()
        admin_app = web.Application()
        admin_app.add_routes(admin.routes(self))
        self._admin_runner = web.AppRunner(admin_app, shutdown_timeout=1.0, access_log=None)
        await self._admin_runner.setup()
        admin_site = web.TCPSite(self._admin_runner, self.admin_host, self.admin_port)
        await admin_site.start()
        self.admin_port = admin_site.port
        if self.picker.settings.mode is FaultMode.REFUSE:
            await self._close_face_port()
        self._saver = asyncio.create_task(self._save_periodically())

    async def close(self) -> None:
        self._stopping = True
        self._release_hung()
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
        for runner in (self._face_runner, self._admin_runner):
            if runner is not None:
                await runner.cleanup()
        await self.save()

    async def _open_face_port(self) -> None:
        assert self._face_runner is not None
        site = web.TCPSite(self._face_runner, self.face_host, self.face_port, reuse_address=True)
        await site.start()
        self.face_port = site.port
        self._face_site = site

    async def _close_face_port(self) -> None:
        """Stop listening (new connections are refused) and drop open connections."""
        if self._face_site is not None:
            await self._face_site.stop()
            self._face_site = None
        assert self._face_runner is not None and self._face_runner.server is not None
        for connection in self._face_runner.server.connections:
            connection.force_close()

    # ---- the fault gate in front of every Face API call ---------------------------------

    @web.middleware
    async def faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        operation = request.match_info.route.name or "Unknown"
        self.received[operation] += 1
        mode = self.picker.choose()
        while mode is FaultMode.HANG:
            if not await self._hang():
                return await self._drop(request, operation)
            mode = self.picker.choose()
        if mode is FaultMode.REFUSE:
            return await self._drop(request, operation)
        delay = self.picker.delay()
        if mode is FaultMode.SLOW:
            delay += self.picker.settings.slow_seconds
        if delay > 0:
            await asyncio.sleep(delay)
        response: web.StreamResponse
        if mode is FaultMode.THROTTLE:
            after = self.picker.settings.retry_after_seconds
            response = error_response(
                FaceApiError(429, "429", f"Rate limit is exceeded. Try again in {after} seconds."),
                headers={"Retry-After": str(after)},
            )
        elif mode is FaultMode.ERROR500:
            response = error_response(
                FaceApiError(500, "InternalServerError", "An internal server error occurred.")
            )
        elif mode is FaultMode.ERROR503:
            response = error_response(
                FaceApiError(503, "ServiceUnavailable", "The service is temporarily unavailable.")
            )
        else:
            response = await handler(request)
        self.answered[operation][response.status] += 1
        return response

    async def _hang(self) -> bool:
        """Wait unanswered; True when released by a change of mode."""
        assert self._released is not None
        released = self._released
        self._count_hung(+1)
        try:
            async with asyncio.timeout(self.picker.settings.hang_max_seconds):
                await released.wait()
        except TimeoutError:
            return False
        finally:
            self._count_hung(-1)
        return not self._stopping

    def _count_hung(self, change: int) -> None:
        assert self._hung_changed is not None
        self.hung += change
        self._hung_changed.set()
        self._hung_changed = asyncio.Event()

    async def wait_hung(self, count: int) -> None:
        """Return once exactly `count` requests are hung (at once, if they are now)."""
        while self.hung != count:
            assert self._hung_changed is not None
            await self._hung_changed.wait()

    def _release_hung(self) -> None:
        if self._released is not None:
            self._released.set()
            self._released = asyncio.Event()

    async def _drop(self, request: web.Request, operation: str) -> web.StreamResponse:
        """Close the connection without an answer (the client sees a reset)."""
        self.dropped[operation] += 1
        transport = request.transport
        if transport is not None:
            transport.abort()
        # connection_lost cancels this task (handler_cancellation) on the next loop turn.
        await asyncio.sleep(_DROP_WAIT_S)
        raise web.HTTPServiceUnavailable()

    # ---- controls (admin port and Python API) ---------------------------------------

    async def set_fault(self, faults: FaultSettings, seed: int | None = None) -> None:
        was_refusing = self.picker.settings.mode is FaultMode.REFUSE
        self.picker.settings = faults
        if seed is not None:
            self.picker.reseed(seed)
        if faults.mode is FaultMode.REFUSE and not was_refusing:
            await self._close_face_port()
        elif was_refusing and faults.mode is not FaultMode.REFUSE:
            await self._open_face_port()
        self._release_hung()
        log.info("fault mode", extra={"fault": faults.to_json(), "seed": self.picker.seed})

    async def set_latency(self, latency: LatencyProfile) -> None:
        self.picker.latency = latency
        log.info("latency", extra={"latency": latency.to_json()})

    async def counts(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "answered": {op: {str(s): n for s, n in c.items()} for op, c in self.answered.items()},
            "dropped": dict(self.dropped),
            "total": sum(self.received.values()),
        }

    async def reset_counts(self) -> None:
        self.received.clear()
        self.answered.clear()
        self.dropped.clear()

    async def status(self) -> dict[str, Any]:
        return {
            "endpoint": _url(self.face_host, self.face_port),
            "adminEndpoint": _url(self.admin_host, self.admin_port),
            "faceListening": self._face_site is not None,
            "fault": self.picker.settings.to_json(),
            "seed": self.picker.seed,
            "latency": self.picker.latency.to_json(),
            "hung": self.hung,
            "faceIds": self.state.detected_count,
            "groups": {kind.value: len(self.state.groups[kind]) for kind in GroupKind},
            "counts": await self.counts(),
            **self.api.strict_status(),
        }

    async def set_strict(self, setting: str, *args: Any) -> dict[str, Any]:
        """Apply one strict setting on the loop (rate, quota, throttle, limited access,
        snapshot); ValueError for a bad value. Returns the strict settings now in force."""
        if setting == "rate":
            self.api.set_rate(*args)
        elif setting == "quota":
            self.api.set_quota(*args)
        elif setting == "throttle":
            self.api.set_throttle(*args)
        elif setting == "limited_access":
            self.api.set_limited_access(*args)
        elif setting == "snapshot_keeps_deleted":
            self.state.snapshot_keeps_deleted = bool(args[0])
        else:
            raise ValueError(f"unknown strict setting {setting!r}")
        log.info("strict setting", extra={"strict": self.api.strict_status()})
        return self.api.strict_status()

    async def clear_state(self) -> None:
        self.state.clear()

    async def save(self) -> None:
        """Write the state file now if anything changed since the last write."""
        path = self.settings.state_file
        if path is None or self._save_lock is None:
            return
        async with self._save_lock:
            version = self.state.version
            if version == self._saved_version:
                return
            text = json.dumps(self.state.to_json())
            await asyncio.to_thread(_write_atomically, path, text)
            self._saved_version = version

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.save_interval_seconds)
            try:
                await self.save()
            except OSError as error:
                log.error("could not save the state", extra={"error": str(error)})


class EmulatorAdmin:
    """The admin controls, callable from any thread but the emulator's own."""

    def __init__(self, emulator: Emulator, loop: asyncio.AbstractEventLoop) -> None:
        self._emulator = emulator
        self._loop = loop

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coroutine.close()
            raise RuntimeError("EmulatorAdmin cannot be called from the emulator's own loop")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=timeout)

    def set_fault(
        self,
        mode: FaultMode | str,
        *,
        slow_seconds: float | None = None,
        retry_after_seconds: int | None = None,
        hang_max_seconds: float | None = None,
        flap_weights: Mapping[FaultMode | str, float] | None = None,
        seed: int | None = None,
    ) -> FaultSettings:
        """Switch the fault mode (and its knobs; those not given are kept). `seed` reseeds
        the flap and latency draws. Returns the settings now in force."""
        changes: dict[str, Any] = {"mode": FaultMode(mode)}
        if slow_seconds is not None:
            changes["slow_seconds"] = slow_seconds
        if retry_after_seconds is not None:
            changes["retry_after_seconds"] = retry_after_seconds
        if hang_max_seconds is not None:
            changes["hang_max_seconds"] = hang_max_seconds
        if flap_weights is not None:
            changes["flap_weights"] = {FaultMode(m): w for m, w in flap_weights.items()}
        faults = dataclasses.replace(self.fault(), **changes)
        self._call(self._emulator.set_fault(faults, seed))
        return faults

    def fault(self) -> FaultSettings:
        return self._emulator.picker.settings

    def set_latency(self, latency: LatencyProfile | str) -> None:
        """A profile by name (`none`, `field`) or an explicit LatencyProfile."""
        if isinstance(latency, str):
            latency = LatencyProfile.named(latency)
        self._call(self._emulator.set_latency(latency))

    def counts(self) -> dict[str, int]:
        """Requests received on the Face port, by operation (swagger operationId)."""
        return dict(self._call(self._emulator.counts())["received"])

    def answered(self) -> dict[str, dict[int, int]]:
        """Answers sent, by operation and HTTP status."""
        return {op: dict(c) for op, c in self._call(self._copy_answered()).items()}

    async def _copy_answered(self) -> dict[str, Counter[int]]:
        return {op: Counter(c) for op, c in self._emulator.answered.items()}

    def reset_counts(self) -> None:
        self._call(self._emulator.reset_counts())

    def set_rate(self, per_second: float | None) -> None:
        """Calls a second before 429s (on the emulator's clock): None for the tier's (S0:
        10, F0: 20 a minute), 0 for no limit. The bucket starts full."""
        self._call(self._emulator.set_strict("rate", per_second))

    def set_throttle(self, form: str, retry_after_header: bool = True) -> None:
        """The 429's body ("rate-limit-exceeded", "status-code", "code-429") and whether it
        carries Retry-After."""
        self._call(self._emulator.set_strict("throttle", form, retry_after_header))

    def set_quota(self, remaining: int | None) -> None:
        """Transactions left this month (0: every call is the quota's 403); None for the
        tier's (F0: 30,000; S0: none)."""
        self._call(self._emulator.set_strict("quota", remaining))

    def set_limited_access(self, mode: str, form: str = "inner-error") -> None:
        """ "granted", "denied" (403 in `form`: "inner-error" or "unsupported-feature") or
        "no-face-id" (detect answers without faceId)."""
        self._call(self._emulator.set_strict("limited_access", mode, form))

    def set_snapshot_keeps_deleted(self, keeps: bool) -> None:
        """Whether Identify still returns persons deleted since the last training."""
        self._call(self._emulator.set_strict("snapshot_keeps_deleted", keeps))

    def status(self) -> dict[str, Any]:
        return self._call(self._emulator.status())

    def wait_hung(self, count: int, timeout: float = 10.0) -> None:
        """Wait until exactly `count` Face API requests are hung (status()["hung"]), woken
        by the change itself rather than by polling. Raises TimeoutError after `timeout`."""
        self._call(asyncio.wait_for(self._emulator.wait_hung(count), timeout), timeout + 5.0)

    def clear_state(self) -> None:
        """Forget every group, person, face and faceId."""
        self._call(self._emulator.clear_state())

    def save_state(self) -> None:
        """Write the state file now (it is also written every second when changed)."""
        self._call(self._emulator.save())


class RunningEmulator:
    """A started emulator: `endpoint` for the SDK, `admin` for the controls, `stop()`."""

    def __init__(
        self,
        emulator: Emulator,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        recognizer: Recognizer | None,
    ) -> None:
        self._emulator = emulator
        self._loop = loop
        self._thread = thread
        self._owned_recognizer = recognizer
        self._stopped = False
        self.settings = emulator.settings
        self.port = emulator.face_port
        self.admin_port = emulator.admin_port
        self.endpoint = _url(emulator.face_host, emulator.face_port)
        """The Face API endpoint to give the SDK: http://HOST:PORT."""
        self.admin_endpoint = _url(emulator.admin_host, emulator.admin_port)
        """Where the admin HTTP API listens (paths under /_emulator/)."""
        self.admin = EmulatorAdmin(emulator, loop)

    def stop(self) -> None:
        """Close both ports (hung requests are dropped), save the state, end the thread."""
        if self._stopped:
            return
        self._stopped = True
        try:
            asyncio.run_coroutine_threadsafe(self._emulator.close(), self._loop).result(timeout=30)
        finally:
            _stop_loop(self._loop, self._thread)
            if self._owned_recognizer is not None:
                self._owned_recognizer.close()

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    async def finish() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_default_executor()

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def start_emulator(
    settings: EmulatorSettings, *, recognizer: Recognizer | None = None
) -> RunningEmulator:
    """Build and start an emulator; return once both ports listen.

    Without `recognizer`, one is made with `settings.workers` processes (loading dlib
    takes a few seconds) and closed by `stop()`; a given one is shared and left open.
    Raises OSError when a port cannot be bound, ValueError for bad settings or state.
    """
    owned = recognizer is None
    if recognizer is None:
        recognizer = Recognizer(settings.workers)
        try:
            recognizer.warm_up()
        except BaseException:
            recognizer.close()
            raise
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="azure-emulator", daemon=True)
    thread.start()
    emulator: Emulator | None = None
    try:
        emulator = Emulator(settings, recognizer)
        asyncio.run_coroutine_threadsafe(emulator.start(), loop).result(timeout=30)
    except BaseException:
        if emulator is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(emulator.close(), loop).result(timeout=10)
        _stop_loop(loop, thread)
        if owned:
            recognizer.close()
        raise
    return RunningEmulator(emulator, loop, thread, recognizer if owned else None)
