"""Fair admission to the recognition workers: who waits, who goes next, who is refused.

Every frame or photo is a `Job` in a bounded queue in front of the workers (engines/pool.py).
The queue is the only way to a worker, and it decides:

- **Identify first.** Frames (Identify, SearchFaces) go before enrolment photos.
- **Fair between callers.** A caller (`Ticket.caller`: the authenticated caller's name, or
  the peer's address on an open server) runs at most `per_caller` jobs at once — with two
  workers or more, one worker is always left for the other callers — and the next job goes
  to the caller with the fewest running, then to the one served longest ago (round robin).
  One credential within its rate limits cannot take every worker, whatever its images cost.
- **Refused at once, not after the deadline.** Each caller's cost per job is measured
  (a moving average of its jobs' worker time). A job is refused when it is admitted
  (`RecognitionBusy`: RESOURCE_EXHAUSTED, reason RECOGNITION_BUSY, with a RetryInfo) when
  the queue is full, or when it would have to wait and the estimate of its finish (see
  `estimate`), with a margin, lies past its deadline. A job that can start at once is
  admitted. A caller sending expensive images is refused early; the others are not
  slowed by it.
- **Never started for nobody.** A job whose deadline has passed, whose future was
  cancelled, or whose caller has gone (`Ticket.gone`, set by the gRPC server when the call
  ends) is dropped when it comes up, without a worker.

The ticket travels in a context variable: rpc/server.py sets it for each call.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from facegate_server.errors import RecognitionBusy, RecognitionTimeout, RecognitionUnavailable

__all__ = ["ENROL", "IDENTIFY", "Admission", "Job", "RecognitionBusy", "Ticket", "current_ticket"]

IDENTIFY = 0
"""Priority of a frame to decide on (Identify, SearchFaces): first."""
ENROL = 1
"""Priority of an enrolment photo: after every frame."""

Clock = Callable[[], float]

MARGIN = 1.15
"""A job is refused when its estimated finish, times this, lies past its deadline: costs
are averages, and an answer late by a little is still late (FACEGATE_RECOGNITION_MARGIN)."""


@dataclass(frozen=True)
class Ticket:
    """Who a job is for: `caller` is the fairness key; `gone` is set when the call ends."""

    caller: str
    gone: threading.Event = field(default_factory=threading.Event, compare=False)


_ticket: ContextVar[Ticket | None] = ContextVar("facegate_ticket", default=None)

ANONYMOUS = Ticket("anonymous")
"""Jobs submitted outside a call (tests, tools) share one caller."""


def current_ticket() -> Ticket:
    """The ticket of the call this thread serves (ANONYMOUS outside one)."""
    return _ticket.get() or ANONYMOUS


@contextmanager
def holding(ticket: Ticket) -> Iterator[None]:
    token = _ticket.set(ticket)
    try:
        yield
    finally:
        _ticket.reset(token)


def set_ticket_token(ticket: Ticket) -> Token[Ticket | None]:
    """Set the ticket in the current context (for a context about to be copied)."""
    return _ticket.set(ticket)


def reset_ticket(token: Token[Ticket | None]) -> None:
    _ticket.reset(token)


@dataclass(eq=False)
class Job:
    """One image for a worker: `call` is (function name, args) for the worker process."""

    args: tuple[Any, ...]
    priority: int
    ticket: Ticket
    deadline: float | None
    future: cf.Future[Any] = field(default_factory=cf.Future)
    attempts: int = 0
    """Times a worker was lost while running it (a second loss fails it)."""
    started: float = 0.0

    @property
    def caller(self) -> str:
        return self.ticket.caller

    def abandoned(self, now: float) -> bool:
        return (
            self.future.cancelled()
            or self.ticket.gone.is_set()
            or (self.deadline is not None and now >= self.deadline)
        )


class Admission:
    """The bounded, prioritised, per-caller fair queue (thread-safe)."""

    def __init__(
        self,
        *,
        limit: int,
        per_caller: int,
        live: Callable[[], int],
        initial_cost: float = 0.2,
        margin: float = MARGIN,
        clock: Clock = time.monotonic,
    ) -> None:
        self.limit = limit
        self.per_caller = per_caller
        self.margin = margin
        self._live = live
        self._clock = clock
        self._queues: dict[int, dict[str, deque[Job]]] = {IDENTIFY: {}, ENROL: {}}
        self._running: Counter[str] = Counter()
        self._active: set[Job] = set()
        self._cost: dict[str, float] = {}
        self._default_cost = initial_cost
        self._served: dict[str, int] = {}
        self._turn = itertools.count()
        self._changed = threading.Condition()
        self.counts: Counter[str] = Counter()
        """admitted, refused_full, refused_late, dropped_gone, dropped_late, retried, lost."""

    # Admission -------------------------------------------------------------------
    def cost(self, caller: str) -> float:
        return self._cost.get(caller, self._default_cost)

    def snapshot(self) -> dict[str, int]:
        """The counts so far (a copy)."""
        with self._changed:
            return dict(self.counts)

    def queued(self) -> int:
        with self._changed:
            return self._queued()

    def _queued(self) -> int:
        return sum(len(q) for by_caller in self._queues.values() for q in by_caller.values())

    def estimate(self, caller: str, priority: int) -> tuple[float, float]:
        """Seconds from now until a new job of `caller` would start, and finish (call under
        the lock).

        A small simulation of the workers: each is free when its running job's remaining
        cost is spent; the jobs fair scheduling would start before this one (its caller's
        own queued jobs, higher priorities, and the callers whose turn comes first) take the
        earliest free worker in turn; this job takes the next, after its caller's running
        jobs when the caller is at its limit. Costs are the callers' measured averages.
        """
        now = self._clock()
        live = max(1, self._live())
        remaining = sorted(max(0.0, self.cost(j.caller) - (now - j.started)) for j in self._active)[
            :live
        ]
        free = remaining + [0.0] * (live - len(remaining))
        heapq.heapify(free)
        mine = self._queues[priority].get(caller, deque())
        my_turn = (self._running[caller], self._served.get(caller, -1))
        ahead = [self.cost(caller)] * len(mine)
        for p, by_caller in self._queues.items():
            if p > priority:
                continue
            for other, queue in by_caller.items():
                if other == caller or self._running[other] >= self.per_caller:
                    continue  # an at-limit caller's next job waits for its own worker
                if p < priority:
                    n = len(queue)
                else:
                    first = (self._running[other], self._served.get(other, -1)) < my_turn
                    n = min(len(queue), len(mine) + (1 if first else 0))
                ahead += [self.cost(other)] * n
        for cost in ahead:
            heapq.heappush(free, heapq.heappop(free) + cost)
        start = heapq.heappop(free)
        if self._running[caller] >= self.per_caller:
            own = [
                max(0.0, self.cost(caller) - (now - j.started))
                for j in self._active
                if j.caller == caller
            ]
            start = max(start, min(own, default=0.0))
        return start, start + self.cost(caller)

    def admit(self, job: Job) -> None:
        """Queue `job`, or raise RecognitionBusy / RecognitionUnavailable at once."""
        with self._changed:
            if self._live() == 0:
                self.counts["refused_unavailable"] += 1
                raise RecognitionUnavailable(
                    "no recognition worker is running (they are being restarted); retry shortly"
                )
            now = self._clock()
            self._drop_abandoned(now)
            if self._queued() >= self.limit:
                self.counts["refused_full"] += 1
                raise RecognitionBusy(
                    f"the recognition queue is full ({self.limit} images wait); retry shortly",
                    retry_delay=round(self.cost(job.caller), 3),
                    metadata={"queued": str(self.limit)},
                )
            start, finish = self.estimate(job.caller, job.priority)
            # A job that can start at once is never refused (nothing would serve it sooner,
            # and a caller whose measured cost exceeds its deadline is measured again).
            if job.deadline is not None and start > 0 and now + finish * self.margin > job.deadline:
                self.counts["refused_late"] += 1
                raise RecognitionBusy(
                    f"this image could not be analysed within its deadline (about "
                    f"{finish * 1000:.0f} ms of work is ahead of it); retry shortly",
                    retry_delay=round(finish, 3),
                    metadata={"estimate_ms": str(round(finish * 1000))},
                )
            self._queues[job.priority].setdefault(job.caller, deque()).append(job)
            self.counts["admitted"] += 1
            self._changed.notify_all()

    def _drop_abandoned(self, now: float) -> None:
        for by_caller in self._queues.values():
            for caller, queue in list(by_caller.items()):
                kept = deque(j for j in queue if not self._dropped(j, now))
                if kept:
                    by_caller[caller] = kept
                else:
                    del by_caller[caller]

    def _dropped(self, job: Job, now: float) -> bool:
        """Fail (or forget) an abandoned queued job; True if it was."""
        if not job.abandoned(now):
            return False
        if job.future.cancelled():
            return True
        if job.ticket.gone.is_set():
            self.counts["dropped_gone"] += 1
            job.future.cancel()
        else:
            self.counts["dropped_late"] += 1
            job.future.set_exception(
                RecognitionTimeout("the deadline passed before a recognition worker was free")
            )
        return True

    # The workers' side --------------------------------------------------------------
    def take(self, timeout: float) -> Job | None:
        """The next job for a free worker (marked running), or None after `timeout`."""
        with self._changed:
            end = self._clock() + timeout
            while True:
                job = self._next(self._clock())
                if job is not None:
                    return job
                left = end - self._clock()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def _next(self, now: float) -> Job | None:
        for priority in (IDENTIFY, ENROL):
            by_caller = self._queues[priority]
            while True:
                eligible = [c for c in by_caller if self._running[c] < self.per_caller]
                if not eligible:
                    break
                caller = min(  # a retried job first, then the fewest running, then turns
                    eligible,
                    key=lambda c: (
                        by_caller[c][0].attempts == 0,
                        self._running[c],
                        self._served.get(c, -1),
                    ),
                )
                queue = by_caller[caller]
                job = queue.popleft()
                if not queue:
                    del by_caller[caller]
                if self._dropped(job, now) or not job.future.set_running_or_notify_cancel():
                    continue
                self._running[caller] += 1
                self._active.add(job)
                self._served[caller] = next(self._turn)
                job.started = now
                return job
        return None

    def finished(self, job: Job) -> None:
        """A worker ran `job` (whatever the image's outcome): learn its caller's cost."""
        with self._changed:
            elapsed = max(0.0, self._clock() - job.started)
            self._release(job)
            known = self._cost.get(job.caller)  # a caller's first job sets its cost
            self._cost[job.caller] = elapsed if known is None else 0.7 * known + 0.3 * elapsed
            self._default_cost = 0.9 * self._default_cost + 0.1 * elapsed
            if len(self._cost) > 10_000:
                self._cost.clear()
                self._served.clear()
            self._changed.notify_all()

    def lost(self, job: Job) -> None:
        """The worker running `job` died or hung: run it once more elsewhere, else fail it.

        One retry only: an image that kills its worker must not kill them all.
        """
        with self._changed:
            self._release(job)
            self.counts["lost"] += 1
            if job.attempts == 0 and not job.abandoned(self._clock()) and self._live() > 0:
                job.attempts += 1
                self.counts["retried"] += 1
                retry: cf.Future[Any] = cf.Future()
                retry.add_done_callback(lambda done: _copy(done, job.future))
                requeued = Job(job.args, job.priority, job.ticket, job.deadline, retry, 1)
                self._queues[job.priority].setdefault(job.caller, deque()).appendleft(requeued)
            else:
                job.future.set_exception(
                    RecognitionUnavailable(
                        "the recognition worker analysing this image stopped (twice: it is "
                        "not retried again)"
                        if job.attempts
                        else "the recognition worker analysing this image stopped",
                        reason="WORKER_LOST",
                    )
                )
            self._changed.notify_all()

    def _release(self, job: Job) -> None:
        self._active.discard(job)
        caller = job.caller
        self._running[caller] -= 1
        if self._running[caller] <= 0:
            del self._running[caller]

    def close(self) -> None:
        """Fail every queued job (the server is stopping) and wake the workers' threads."""
        self.fail_queued("the server is stopping")

    def fail_queued(self, why: str) -> None:
        """Fail every queued job at once with RecognitionUnavailable (no worker is left)."""
        with self._changed:
            for by_caller in self._queues.values():
                for queue in by_caller.values():
                    for job in queue:
                        if job.future.set_running_or_notify_cancel():
                            job.future.set_exception(RecognitionUnavailable(why))
                by_caller.clear()
            self._changed.notify_all()


def _copy(source: cf.Future[Any], target: cf.Future[Any]) -> None:
    """Settle the caller's (running) future with the retry's outcome."""
    if target.done():
        return
    if source.cancelled():
        target.set_exception(RecognitionTimeout("the retried image was abandoned"))
        return
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
