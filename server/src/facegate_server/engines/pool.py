"""The recognition workers: FaceGate's own processes, fed from the admission queue.

Each worker is a spawned process (never forked: gRPC threads don't fork) with a pipe of its
own and a thread in the server that owns it (a "slot"): the slot takes the next job from
the admission queue (engines/admission.py), sends it down the pipe, and waits for the answer
while watching its process. So the server knows which worker runs which job, and heals
one worker at a time:

- **Dead** (SIGKILL, a crash in dlib, the OOM killer): the pipe closes. Only that worker
  is replaced; the others keep serving. The job it was running is queued once more, first
  in line, for another worker — once: an image that kills workers kills two at most.
- **Hung** (SIGSTOP, a native call that never returns): each worker's heartbeat thread
  stamps a shared clock every 0.1 s; the pool's watchdog thread kills (SIGKILL) a worker
  whose stamp is older than `hang_after` seconds, idle or busy, and its slot replaces it
  and retries its job as above (a slot blocked writing a large image to a stopped worker
  is freed by the kill too). A job running longer than `job_limit` is treated the same
  way. (dlib calls hold the GIL for tens of milliseconds, so a stale heartbeat means a
  stopped worker, not a busy one.)
- **Starting**: a new worker loads its models (a few seconds) while the others serve.

`live()` is the number of workers ready to take a job; with none, jobs are refused at once
(UNAVAILABLE) and health reports NOT_SERVING unless the cloud can decide (app.py).
`state()` is what GetStatus shows of each worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from facegate_server.domain import WorkerStatus
from facegate_server.engines import worker
from facegate_server.engines.admission import (
    ENROL,
    IDENTIFY,
    MARGIN,
    Admission,
    Job,
    current_ticket,
)
from facegate_server.engines.images import check_size
from facegate_server.engines.worker import Analysis, FaceRules
from facegate_server.errors import RecognitionTimeout, RecognitionUnavailable

log = logging.getLogger("facegate_server.engines.local")

__all__ = ["ENROL", "IDENTIFY", "WorkerPool"]

_CTX = multiprocessing.get_context("spawn")


def _heartbeat(stamp: Any) -> None:
    def beat() -> None:
        while True:
            stamp.value = time.monotonic()
            time.sleep(0.1)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def serve(
    conn: Connection,
    stamp: Any,
    initializer: Callable[..., None],
    initargs: Sequence[Any],
) -> None:
    """A worker process's main: start, say "ready", then run jobs until told to stop."""
    _heartbeat(stamp)
    initializer(*initargs)
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            answer: tuple[bool, Any] = (True, worker.analyse(*message))
        except Exception as error:  # the image's failure, sent back
            answer = (False, error)
        try:
            conn.send(answer)
        except (TypeError, AttributeError, pickle.PicklingError) as unsendable:
            conn.send((False, RuntimeError(f"the worker's answer could not be sent: {unsendable}")))


class _Slot:
    """One worker process and the thread in the server that feeds and watches it."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.state = "starting"
        self.pid = 0
        self.jobs = 0
        self.restarts = 0
        self.ready = threading.Event()
        self.process: Any = None
        self._conn: Connection | None = None
        self._stamp: Any = _CTX.RawValue("d", 0.0)
        self.job: Job | None = None
        self.killed_for = ""
        self.thread = threading.Thread(target=self._run, name=f"worker-{index}", daemon=True)

    # The slot's thread ----------------------------------------------------------------
    def _run(self) -> None:
        pool = self.pool
        while not pool.closing.is_set():
            if self._start():
                self._serve()
            self._stop()
            if pool.closing.is_set():
                return
            self.restarts += 1
            pool.closing.wait(0.5)  # a worker that dies at once does not spin

    def _start(self) -> bool:
        pool = self.pool
        self.state = "starting"
        parent, child = _CTX.Pipe()
        self._stamp.value = time.monotonic()
        process = _CTX.Process(
            target=serve,
            args=(child, self._stamp, pool.initializer, pool.initargs),
            name=f"facegate-worker-{self.index}",
            daemon=True,
        )
        process.start()
        child.close()
        self.process, self._conn, self.pid = process, parent, process.pid or 0
        if pool.cores and self.pid:
            core = pool.cores[self.index % len(pool.cores)]
            with contextlib.suppress(OSError):  # the process may already be gone
                os.sched_setaffinity(self.pid, {core})
        self.killed_for = ""
        end = time.monotonic() + pool.start_timeout
        while not pool.closing.is_set() and time.monotonic() < end:
            try:
                if parent.poll(0.1):
                    if parent.recv() == "ready":
                        self._set("idle")
                        log.info(
                            "recognition worker ready", extra={"slot": self.index, "pid": self.pid}
                        )
                        return True
                    return False
            except (EOFError, OSError):
                break
            if process.exitcode is not None:
                break
        if not pool.closing.is_set():
            log.error("a recognition worker failed to start", extra={"slot": self.index})
        return False

    def _set(self, state: str) -> None:
        was_ready = self.ready.is_set()
        self.state = state
        if state in ("idle", "busy"):
            self.ready.set()
        else:
            self.ready.clear()
        if was_ready != self.ready.is_set():
            self.pool.changed()

    def check(self) -> None:
        """The watchdog's look at this worker: kill it when hung or overrunning (its slot's
        thread, blocked on the pipe or waiting for an answer, then sees it die)."""
        process, job = self.process, self.job
        if not self.ready.is_set() or process is None or process.exitcode is not None:
            return
        now = time.monotonic()
        if now - self._stamp.value > self.pool.hang_after:
            self.killed_for = "hung"
        elif job is not None and now - job.started > self.pool.job_limit:
            self.killed_for = "overran its job limit"
        else:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)

    def _serve(self) -> None:
        pool, conn, process = self.pool, self._conn, self.process
        assert conn is not None and process is not None
        while not pool.closing.is_set():
            job = pool.admission.take(timeout=0.1)
            if job is None:
                if process.exitcode is not None:
                    self._lost(None, self.killed_for or "died")
                    return
                continue
            self.job = job
            self._set("busy")
            try:
                conn.send(job.args)
                # Sleep until the answer comes or the process ends (one wake-up a job, not
                # one every few ms: this thread shares the cores with the workers).
                while not wait([conn, process.sentinel], 0.25):
                    if pool.closing.is_set():
                        raise EOFError
                if not conn.poll():  # ended without an answer
                    raise EOFError
                ok, value = conn.recv()
            except (EOFError, OSError):
                self._lost(job, "closing" if pool.closing.is_set() else self.killed_for or "died")
                return
            finally:
                self.job = None
            pool.admission.finished(job)
            self.jobs += 1
            self._set("idle")
            if not job.future.done():
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def _lost(self, job: Job | None, problem: str) -> None:
        self._set("stopped")
        if problem != "closing":
            log.error(
                "a recognition worker %s; replacing it",
                problem,
                extra={"slot": self.index, "pid": self.pid, "job": job is not None},
            )
        if job is not None:
            self.pool.admission.lost(job)

    def _stop(self) -> None:
        """End this slot's process (kill it: it may be stopped or hung)."""
        self._set("stopped")
        process, conn = self.process, self._conn
        if conn is not None:
            conn.close()
        if process is not None:
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            process.join(5)
        self.process, self._conn = None, None


class WorkerPool:
    """The recognition processes and the admission queue in front of them.

    `queue`: the most images waiting (default 8 a worker); `per_caller`: the most jobs one
    caller runs at once (default: all workers but one); `margin`: the admission's refusal
    margin; `hang_after`: seconds of silence after which a worker is hung; `job_limit`: the
    longest one image may take (the FACEGATE_RECOGNITION_* and FACEGATE_WORKER_* settings).
    """

    def __init__(
        self,
        workers: int,
        *,
        max_bytes: int,
        max_side: int,
        queue: int | None = None,
        per_caller: int | None = None,
        margin: float = MARGIN,
        hang_after: float = 2.0,
        job_limit: float = 60.0,
        start_timeout: float = 120.0,
        encoder: worker.Encoder = worker.DEFAULT_ENCODER,
        initializer: Callable[..., None] = worker.init_worker,
        initargs: Sequence[Any] | None = None,
        max_photo_bytes: int | None = None,
        pin: bool = False,
    ) -> None:
        """`max_bytes` bounds a frame, `max_photo_bytes` an enrolment photo (default: the
        same); `max_side` is the longest side decoded (engines/images.py). `pin`: each worker
        runs on a core of its own (`os.sched_setaffinity`), when there are no more workers
        than cores this process may use (else nothing is pinned)."""
        self.workers = workers
        usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.cores: list[int] = usable if pin and 0 < workers <= len(usable) else []
        """The core each slot's worker is pinned to, by slot index (empty: not pinned)."""
        self._max_bytes = max_bytes
        self._max_photo_bytes = max_bytes if max_photo_bytes is None else max_photo_bytes
        self._max_side = max_side
        self.hang_after = hang_after
        self.job_limit = job_limit
        self.start_timeout = start_timeout
        self.initializer = initializer
        self.encoder = encoder
        self.initargs = (encoder,) if initargs is None else tuple(initargs)
        self.closing = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self.admission = Admission(
            limit=queue if queue is not None else 8 * workers,
            per_caller=per_caller if per_caller is not None else max(1, workers - 1),
            live=self.live,
            margin=margin,
        )
        self._slots = [_Slot(self, i) for i in range(workers)]
        for slot in self._slots:
            slot.thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="worker-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self.closing.wait(0.1):
            for slot in self._slots:
                slot.check()

    def warm_up(self, timeout: float | None = None) -> None:
        """Wait until every worker has loaded and run the models."""
        end = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        for slot in self._slots:
            if not slot.ready.wait(max(0.0, end - time.monotonic())):
                log.error("recognition workers failed to start")
                return

    def live(self) -> int:
        """Workers ready to take a job now."""
        return sum(1 for slot in self._slots if slot.ready.is_set())

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from a slot's thread) when a worker starts or stops."""
        self._listeners.append(listener)

    def changed(self) -> None:
        if self.live() == 0:
            self.admission.fail_queued(
                "no recognition worker is running (they are being restarted); retry shortly"
            )
        for listener in self._listeners:
            listener()

    def submit(
        self,
        data: bytes,
        rules: FaceRules,
        *,
        priority: int = IDENTIFY,
        timeout: float | None = None,
        photo: bool = False,
    ) -> cf.Future[Analysis]:
        """Queue one image for analysis (an enrolment photo if `photo`, with its own byte
        limit); the future raises ImageRejected for unusable bytes.

        Refused at once (RecognitionBusy, RecognitionUnavailable) when it cannot be served
        within `timeout` seconds; dropped unstarted when its caller goes.
        """
        max_bytes = self._max_photo_bytes if photo else self._max_bytes
        check_size(data, max_bytes)
        if self.closing.is_set():
            raise RecognitionUnavailable("the server is stopping")
        job = Job(
            (data, max_bytes, self._max_side, rules),
            priority,
            current_ticket(),
            None if timeout is None else time.monotonic() + timeout,
        )
        self.admission.admit(job)
        return job.future

    def result(self, future: cf.Future[Analysis], timeout: float) -> Analysis:
        try:
            return future.result(timeout=max(0.0, timeout))
        except cf.TimeoutError:
            future.cancel()  # never started, if it was still queued
            raise RecognitionTimeout(
                f"face recognition did not finish within {timeout * 1000:.0f} ms"
            ) from None
        except cf.CancelledError:
            raise RecognitionTimeout("the caller went away before the image was analysed") from None

    def pids(self) -> list[int]:
        """The process ids of the workers ready for jobs."""
        return sorted(slot.pid for slot in self._slots if slot.ready.is_set())

    def state(self) -> tuple[WorkerStatus, ...]:
        return tuple(
            WorkerStatus(slot.index, slot.state, slot.pid, slot.jobs, slot.restarts)
            for slot in self._slots
        )

    def close(self) -> None:
        self.closing.set()
        self.admission.close()
        for slot in self._slots:
            slot.thread.join(10)
        self._watchdog.join(10)
