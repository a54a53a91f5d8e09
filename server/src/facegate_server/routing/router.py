"""The fallback: one engine that routes each frame between the cloud and the local engine,
and answers within the budget whatever the cloud does.

Policies (FACEGATE_ROUTING_POLICY):
- `cloud-first`: the cloud call and the local engine start together. The cloud decides if
  it answers before the deadline (the budget, less a small reserve; a shorter gRPC
  deadline wins); otherwise the local engine, which has usually finished by then, decides.
- `local-first`: the local engine runs first; when it is confident (a grant at or above
  FACEGATE_LOCAL_CONFIDENT, a clear stranger, no face, several faces) it decides alone and
  the cloud costs nothing; otherwise the cloud is asked with the time that is left.
- `local-only`: the cloud is never asked.

The cloud is skipped at once while the circuit breaker is open, and when too many cloud
calls are already in flight (a hung cloud cannot pile up threads or sockets: each call is
bounded by its read timeout and the number in flight by FACEGATE_CLOUD_SLOTS). A late
cloud answer is dropped; a cancelled call does not make its second request.

When both engines answer (agreement policy, FACEGATE_ON_DISAGREEMENT):
- the cloud grants m, the local engine grants another member → deny (never a wrong grant);
- `deny-on-conflict` (default): otherwise the cloud's answer stands, except that the
  local engine's grant stands when the cloud says "unknown" for a member the cloud has
  not been trained on yet (enrolled a moment ago, or enrolled while the cloud was away);
- `require-agreement`: a grant needs both engines to grant the same member (the same
  not-yet-trained exception applies).
Both engines' answers go into the response and the access log.

Verify (1:1) is routed by the same machinery as Identify: the same policies, breaker, slots
and budget, and the same agreement rules with "not this member" in place of "unknown".
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

from facegate_server.domain import (
    Decision,
    EngineKind,
    EngineOutcome,
    EngineReport,
    FaceTemplate,
    Identification,
    SearchResult,
)
from facegate_server.engines.base import Attempt, EngineFailure, RecognitionEngine
from facegate_server.errors import (
    FaceGateError,
    RateLimited,
    RecognitionTimeout,
    RecognitionUnavailable,
)
from facegate_server.routing.breaker import CircuitBreaker

log = logging.getLogger(__name__)

RESERVE = 0.1  # seconds kept back from the budget to decide, log the entry and answer


class Policy(enum.Enum):
    CLOUD_FIRST = "cloud-first"
    LOCAL_FIRST = "local-first"
    LOCAL_ONLY = "local-only"


class Agreement(enum.Enum):
    DENY_ON_CONFLICT = "deny-on-conflict"
    REQUIRE_AGREEMENT = "require-agreement"


@dataclass(frozen=True)
class Question:
    """What both engines are asked about a frame: Identify's question or Verify's."""

    ask: Callable[[RecognitionEngine, float, Attempt | None], Identification]
    """Ask one engine, with a timeout and (the cloud) the call's shared Attempt."""
    not_granted: Decision
    """The denial for "a face, but not a member's": unknown face, or not this member."""


def _report(found: Identification, outcome: EngineOutcome, latency: float) -> EngineReport:
    return EngineReport(
        engine=found.engine,
        outcome=outcome,
        decision=found.decision,
        member_id=found.member_id,
        confidence=found.confidence,
        latency=timedelta(seconds=latency),
    )


class RoutingEngine:
    """The engine the gate asks: routes between `local` and `cloud` (None: no cloud).

    Itself a RecognitionEngine: enrolment goes to both engines, search to the local one.
    `clock` is monotonic seconds (injected by tests, with the breaker's).
    """

    def __init__(
        self,
        local: RecognitionEngine,
        cloud: RecognitionEngine | None,
        *,
        policy: Policy = Policy.CLOUD_FIRST,
        agreement: Agreement = Agreement.DENY_ON_CONFLICT,
        breaker: CircuitBreaker | None = None,
        cloud_slots: int = 4,
        local_confident: float = 0.75,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.cloud = cloud
        self.policy = policy if cloud is not None else Policy.LOCAL_ONLY
        self.agreement = agreement
        self.breaker = breaker or CircuitBreaker(clock=clock)
        self.local_confident = local_confident
        self._clock = clock
        self._slots = threading.BoundedSemaphore(cloud_slots)
        self._cloud_pool = cf.ThreadPoolExecutor(cloud_slots, thread_name_prefix="cloud")
        # One waiter per Identify in progress: as many as the gRPC server has threads.
        self._local_pool = cf.ThreadPoolExecutor(64, thread_name_prefix="local-wait")
        self.last_error = ""
        self.last_error_time = 0.0

    @property
    def kind(self) -> EngineKind:
        """The engine that decides when both answer: the cloud, unless local-only."""
        if self.cloud is None or self.policy is Policy.LOCAL_ONLY:
            return self.local.kind
        return self.cloud.kind

    @property
    def name(self) -> str:
        if self.cloud is None:
            return f"{self.policy.value}({self.local.name})"
        return f"{self.policy.value}({self.cloud.name}, {self.local.name})"

    def close(self) -> None:
        self._cloud_pool.shutdown(wait=False, cancel_futures=True)
        self._local_pool.shutdown(wait=False, cancel_futures=True)
        self.local.close()
        if self.cloud is not None:
            self.cloud.close()

    # Membership: both engines learn and forget; search is the local engine's.
    def enrol(
        self, photos: Sequence[bytes], timeout: float, templates: Sequence[FaceTemplate]
    ) -> list[FaceTemplate]:
        templates = self.local.enrol(photos, timeout, templates)
        if self.cloud is not None:
            templates = self.cloud.enrol(photos, timeout, templates)
        return list(templates)

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        self.local.enrolled(member_id, templates)
        if self.cloud is not None:
            self.cloud.enrolled(member_id, templates)

    def removed(self, member_id: str) -> None:
        self.local.removed(member_id)
        if self.cloud is not None:
            self.cloud.removed(member_id)

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        self.local.template_removed(member_id, template)
        if self.cloud is not None:
            self.cloud.template_removed(member_id, template)

    def knows(self, member_id: str) -> bool:
        return self.local.knows(member_id)

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        return self.local.search(image, timeout, max_candidates)

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        return self._route(
            Question(
                lambda engine, budget, call: engine.identify(image, budget, call),
                Decision.DENIED_UNKNOWN_FACE,
            ),
            timeout,
        )

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        return self._route(
            Question(
                lambda engine, budget, call: engine.verify(member_id, image, budget, call),
                Decision.DENIED_NOT_THIS_MEMBER,
            ),
            timeout,
        )

    def _route(self, question: Question, timeout: float) -> Identification:
        deadline = self._clock() + timeout
        if self.policy is Policy.LOCAL_ONLY:
            return question.ask(self.local, timeout, None)
        if self.policy is Policy.LOCAL_FIRST:
            return self._local_first(question, deadline)
        return self._cloud_first(question, deadline)

    def _cloud_first(self, question: Question, deadline: float) -> Identification:
        started = self._clock()
        local_future = self._local_pool.submit(  # the call's context: its caller's ticket
            contextvars.copy_context().run,
            question.ask,
            self.local,
            max(0.0, deadline - started),
            None,
        )
        cloud_future, call, skipped = self._start_cloud(question, deadline)
        try:
            return self._combine(
                question, local_future, cloud_future, call, skipped, deadline, started
            )
        finally:
            call.cancelled.set()

    def _local_first(self, question: Question, deadline: float) -> Identification:
        started = self._clock()
        local = question.ask(self.local, max(0.0, deadline - started), None)
        local_latency = self._clock() - started
        if self._confident(local):
            return replace(
                local,
                reports=(
                    _report(local, EngineOutcome.DECIDED, local_latency),
                    EngineReport(
                        self._cloud_kind, EngineOutcome.NOT_USED, detail="local engine confident"
                    ),
                ),
            )
        done: cf.Future[Identification] = cf.Future()
        done.set_result(local)
        cloud_future, call, skipped = self._start_cloud(question, deadline)
        try:
            return self._combine(
                question, done, cloud_future, call, skipped, deadline, started, local_latency
            )
        finally:
            call.cancelled.set()

    def _confident(self, local: Identification) -> bool:
        if local.decision is Decision.GRANTED:
            return local.confidence >= self.local_confident
        if local.decision in (Decision.DENIED_UNKNOWN_FACE, Decision.DENIED_NOT_THIS_MEMBER):
            return local.confidence <= 1.0 - self.local_confident
        # Two members too close to call: a second opinion is worth it. No face, several
        # faces, poor quality: the cloud would see the same.
        return local.decision is not Decision.DENIED_AMBIGUOUS

    def _start_cloud(
        self, question: Question, deadline: float
    ) -> tuple[cf.Future[Identification] | None, Attempt, EngineReport | None]:
        """Start the cloud call, or say why it was skipped."""
        call = Attempt()
        assert self.cloud is not None
        if not self.breaker.allow():
            return (
                None,
                call,
                EngineReport(
                    self._cloud_kind,
                    EngineOutcome.CIRCUIT_OPEN,
                    detail="circuit open: cloud skipped",
                ),
            )
        if not self._slots.acquire(blocking=False):
            self.breaker.release()
            return (
                None,
                call,
                EngineReport(
                    self._cloud_kind,
                    EngineOutcome.TIMED_OUT,
                    detail="too many cloud calls still in flight: cloud skipped",
                ),
            )
        budget = max(0.05, deadline - self._clock() - RESERVE)
        cloud = self.cloud

        def run() -> Identification:
            try:
                return question.ask(cloud, budget, call)
            finally:
                self._slots.release()

        try:
            return self._cloud_pool.submit(run), call, None
        except RuntimeError:  # shutting down
            self._slots.release()
            self.breaker.release()
            return (
                None,
                call,
                EngineReport(self._cloud_kind, EngineOutcome.ERROR, detail="server stopping"),
            )

    def _cloud_failed(self, failure: EngineFailure, started: float) -> EngineReport:
        """Tell the breaker (when the cloud is at fault); the cloud's part in the report."""
        self.last_error = failure.detail
        self.last_error_time = time.time()
        if not failure.engine_fault:
            # The cloud works: it is not ready, or this frame was refused. Neither is a
            # reason to stop asking it.
            self.breaker.release()
        elif failure.outcome is EngineOutcome.THROTTLED:
            self.breaker.record_failure(retry_after=failure.retry_after or 0.0)
        else:
            self.breaker.record_failure()
        return EngineReport(
            self._cloud_kind,
            failure.outcome,
            detail=failure.detail,
            latency=timedelta(seconds=self._clock() - started),
        )

    @property
    def _cloud_kind(self) -> EngineKind:
        return self.cloud.kind if self.cloud is not None else EngineKind.AZURE

    def _combine(
        self,
        question: Question,
        local_future: cf.Future[Identification],
        cloud_future: cf.Future[Identification] | None,
        call: Attempt,
        skipped: EngineReport | None,
        deadline: float,
        started: float,
        local_latency: float | None = None,
    ) -> Identification:
        cloud: Identification | None = None
        cloud_report = skipped
        if cloud_future is not None:
            try:
                cloud = cloud_future.result(timeout=max(0.0, deadline - RESERVE - self._clock()))
                self.breaker.record_success()
            except cf.TimeoutError:
                cloud_report = self._cloud_failed(
                    EngineFailure(EngineOutcome.TIMED_OUT, "no cloud answer within the budget"),
                    started,
                )
            except EngineFailure as failure:
                cloud_report = self._cloud_failed(failure, started)
            except Exception as error:  # never let a cloud surprise reach the caller
                log.exception("unexpected cloud error")
                cloud_report = self._cloud_failed(
                    EngineFailure(EngineOutcome.ERROR, type(error).__name__), started
                )
        cloud_latency = self._clock() - started
        transactions = call.billed

        local_error: FaceGateError | None = None
        try:
            local = local_future.result(timeout=max(0.0, deadline - self._clock()))
        except (cf.TimeoutError, RecognitionTimeout):
            local = None
        except (RateLimited, RecognitionUnavailable) as refused:  # busy, or no worker
            local, local_error = None, refused
        if local_latency is None:
            local_latency = self._clock() - started

        if cloud is None:
            if local is None:
                if local_error is not None:
                    raise local_error
                raise RecognitionTimeout("neither engine answered within the budget")
            assert cloud_report is not None
            return replace(
                local,
                reports=self._billed(
                    (_report(local, EngineOutcome.DECIDED, local_latency), cloud_report),
                    transactions,
                ),
                cloud_transactions=transactions,
            )
        if local is None:
            return replace(
                cloud,
                reports=self._billed(
                    (
                        _report(cloud, EngineOutcome.DECIDED, cloud_latency),
                        EngineReport(self.local.kind, EngineOutcome.TIMED_OUT),
                    ),
                    transactions,
                ),
                cloud_transactions=transactions,
            )
        decided, cloud_outcome, local_outcome = self._decide(question, cloud, local)
        return replace(
            decided,
            reports=self._billed(
                (
                    _report(cloud, cloud_outcome, cloud_latency),
                    _report(local, local_outcome, local_latency),
                ),
                transactions,
            ),
            cloud_transactions=transactions,
        )

    def _billed(
        self, reports: tuple[EngineReport, ...], transactions: int
    ) -> tuple[EngineReport, ...]:
        """The reports, the cloud's with the transactions it spent (for the access log)."""
        return tuple(
            replace(r, transactions=transactions)
            if r.engine is self._cloud_kind and r.engine is not self.local.kind
            else r
            for r in reports
        )

    def _decide(
        self, question: Question, cloud: Identification, local: Identification
    ) -> tuple[Identification, EngineOutcome, EngineOutcome]:
        """Both engines answered: (decision, the cloud's part, the local engine's part)."""
        granted = Decision.GRANTED
        if cloud.decision is granted and local.decision is granted:
            if cloud.member_id == local.member_id:
                return cloud, EngineOutcome.DECIDED, EngineOutcome.AGREED
            denial = Identification(
                question.not_granted,
                self._cloud_kind,
                face_box=cloud.face_box,
                hint="please try again",
            )
            return denial, EngineOutcome.DISAGREED, EngineOutcome.DISAGREED
        if local.decision is granted and cloud.decision is question.not_granted:
            assert self.cloud is not None
            if not self.cloud.knows(local.member_id):
                # Enrolled but not yet trained in the cloud: the local engine knows them.
                return local, EngineOutcome.OUTRANKED, EngineOutcome.DECIDED
        if cloud.decision is granted and self.agreement is Agreement.REQUIRE_AGREEMENT:
            denial = replace(cloud, decision=question.not_granted, member_id="")
            return denial, EngineOutcome.DISAGREED, EngineOutcome.DISAGREED
        agreed = cloud.decision is local.decision and cloud.member_id == local.member_id
        return (
            cloud,
            EngineOutcome.DECIDED,
            (EngineOutcome.AGREED if agreed else EngineOutcome.OUTRANKED),
        )
