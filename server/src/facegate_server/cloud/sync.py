"""Keeping the cloud group in step with the store: the outbox replayer and `facegate sync`.

Enrolments, deletions and removed photos commit locally at once, with outbox entries in the same
transaction (store/base.py). A background thread replays the outbox in order, then queues
one training for the whole batch and polls it until it has finished; members become
"ready" in the cloud only then, and until then the local engine lets them in.

Failures are classified (cloud/azure.py's CloudFailure):
- an entry's own fault (a photo the cloud refuses: 400 InvalidImage, InvalidImageSize,
  BadArgument, no face found) parks that entry with its reason (`facegate status`; put back
  in line by `facegate sync --retry-parked`); the entries behind it keep moving;
- a fault of the resource (401 key, 403 quota or Limited Access) pauses the whole outbox
  with a reason and what to do (cloud/health.py); it resumes by itself when the readiness
  check, run again on the replayer's back-off, passes;
- anything else (time-outs, 5xx, 429, unreachable) pauses it for a back-off that grows
  (a 429's wait when it gives one), then it retries.
The replayer has its own back-off: enrolment, deletion and training never touch the
circuit breaker the turnstiles' Identify calls share (routing/breaker.py).

Training is one state machine: read from the cloud at start-up (a training may be running,
or may have finished while FaceGate was down), never overwritten while running (changes
replayed meanwhile queue one more training behind it, never more than one), a 409
TrainingNotFinished means "running", and it is polled with a back-off that grows with the
group's size, on the injected clock.

Replays are idempotent. Before each cloud write the entry's attempt is counted in the
store; an entry with an earlier attempt may have taken effect without FaceGate hearing of
it (a timeout, a crash, SIGKILL). A face is looked for among its person's faces (one call,
by the face's tag in userData). A PersonCreate whose answer was lost left no id to look
for: a new person is created, and a background sweep pages through the group (one page a
tick) for persons tagged with this store's identity that FaceGate does not remember, and
deletes them — never a full listing on the replay path.

Servers sharing one outbox (a chain on PostgreSQL) replay it one at a time: the replayer
writes to the cloud only while it holds the lease (cloud/lease.py; a single server's lease
is always held), checks it before every cloud write (create or delete a person, add or
delete a face, train), and on taking it over reloads the cloud persons from the store and
reads the training state from the cloud. An uncertain create (the previous holder may have
been stopped after creating the person) first looks for the member's person in the group,
so a takeover never gives a member two persons; and a person made is recorded in the store
only after the lease is checked again, so a holder frozen past its lease during the create
does not record a second person beside the next holder's (its late person is an orphan).

A reconciliation (`facegate sync`, SyncCloud) compares the group with the store and repairs
what differs: members without a person, faces missing from a person, and this store's
persons and faces that FaceGate does not know (orphans). A person another store made
(another tag) is never touched. With dry_run it only reports. SyncCloud only starts one (or
joins the running one) and answers at once with the last finished one's report; the
replayer's thread runs it a page per tick after the outbox's replays, so enrolments and
Identify keep moving: first the group's persons (one call a page, faces compared with the
store's), then the store's members (those whose person the group did not hold). It keeps
no more than the ids of the persons it has seen, and reads no photo but a kept one it
re-adds.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from facegate_server.cloud.azure import PAGE, AzureFace, CloudFailure
from facegate_server.cloud.engine import CloudPeople
from facegate_server.cloud.health import CloudHealth, Readiness
from facegate_server.cloud.lease import Lease, LeaseKeeper, LocalLease
from facegate_server.domain import (
    Change,
    ChangeKind,
    EngineOutcome,
    OutboxEntry,
    Reconciliation,
    SyncReport,
)
from facegate_server.errors import StoreUnavailable
from facegate_server.store import Store

log = logging.getLogger(__name__)

BATCH = 50
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
"""The back-off after a passing fault (time-out, 5xx, unreachable): 1 s, doubling, ≤ 60 s."""
MAX_CHECK = 300.0
"""The back-off of the readiness check while the cloud is off or paused: ≤ 5 min (each
check costs two transactions)."""
FAILED_TRAINING_RETRY = 30.0
CALLS_PER_ENTRY = 2  # an add-face: a person create (the member's first) and the add
CLIENT_RATE_LIMIT = "ClientRateLimit"
MEMBER_PAGE = 1_000
"""Store members a reconciliation checks a tick (the group's persons: PAGE a tick)."""
REPORTED = 5_000
"""The differences a reconciliation keeps to report (it counts them all)."""


def face_tag(face_id: int) -> str:
    return f"facegate-face:{face_id}"


def poll_delays(persons: int) -> tuple[float, float]:
    """(first poll, longest wait between polls) for a group of `persons`.

    Training a LargePersonGroup takes seconds for a few thousand persons and up to tens of
    minutes for a million ("Use the large-scale feature", Face documentation): the first
    poll comes after 1 s plus 1 s per 10,000 persons, each next one 1.5 times later, at
    most 30 s plus 1 s per 2,000 persons (a million: about 8 minutes). A poll is a paid
    transaction."""
    return 1.0 + persons / 10_000, 30.0 + persons / 2_000


class LeaseLost(Exception):
    """The lease's check failed before a cloud write: the write is not made."""


class Training(enum.Enum):
    IDLE = "idle"  # nothing to train
    NEEDED = "needed"  # the group changed since the last training was queued
    RUNNING = "running"
    FAILED = "failed"


class CloudSync:
    def __init__(
        self,
        face: AzureFace,
        store: Store,
        people: CloudPeople,
        health: CloudHealth | None = None,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        lease: Lease | None = None,
    ) -> None:
        self.face = face
        self.lease: Lease = lease or LocalLease()
        self._local = isinstance(self.lease, LocalLease)
        self.keeper = LeaseKeeper(self.lease)
        self._token: int | None = None
        """The lease's token this replayer writes under; None: not holding it."""
        self.store = store
        self.people = people
        self.health = health or CloudHealth()
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # one replay or reconcile at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._group_checked = False
        self._started = False  # the training state has been read from the cloud
        self.training = Training.IDLE
        self.training_queued = False  # one more training behind the running one
        self._next_poll = 0.0
        self._poll_delay = 1.0
        self._retry_at = 0.0
        self._retry_delay = 0.0
        self.waiting = ""
        """Why the outbox is not moving now, and when it retries; empty while it moves."""
        self._sweep = False
        self._sweep_from: str | None = None
        self.last_error = ""
        self.last_error_time = 0.0
        self._reconcile_lock = threading.Lock()  # guards the three below (SyncCloud reads)
        self._reconciling: _Reconcile | None = None
        self._reconcile_queued: _Reconcile | None = None  # of the other kind, behind it
        self._reconciled: Reconciliation | None = None  # the last finished one
        self._reconcile_count = 0

    # The background thread
    def start(self) -> None:
        if not self._local:
            self.keeper.start()
        self._thread = threading.Thread(target=self._run, name="cloud-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self._local:
            # No write in flight: the next server may take over now. With one still in
            # flight, the lease is left to lapse (its ttl) instead.
            idle = self._lock.acquire(timeout=5)
            try:
                self.keeper.stop(release=idle)
            finally:
                if idle:
                    self._lock.release()
            self.lease.close()

    def wake(self) -> None:
        """Something was enrolled or deleted: replay now rather than at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep syncing whatever happened; the next tick retries
                log.exception("cloud sync failed")
            # Sooner when only our own rate limit holds the outbox back.
            due = self._retry_at - self._clock()
            if self.waiting.startswith("keeping to"):
                delay = max(0.05, min(self.interval, due))
            elif self._reconciling is not None and not self.waiting:
                delay = 0.0  # the next page now: replays still come first each tick
            else:
                delay = self.interval
            self._wake.wait(delay)
            self._wake.clear()

    def run_once(self) -> None:
        """Check readiness when due; replay the outbox; queue or poll training; sweep."""
        with self._lock:
            if self._clock() < self._retry_at:
                return
            try:
                if self.health.state.readiness is not Readiness.READY:
                    # Every server checks (its Identify path reads the result); only the
                    # lease's holder writes.
                    state = self.health.check(self.face)
                    if state.readiness is not Readiness.READY:
                        self._wait(state.describe(), MAX_CHECK)
                        return
                if not self._hold_lease():
                    return
                self._ensure_group()
                self._start_up()
                self._replay_all()
                self._train()
                self._sweep_page()
                self._reconcile_page()
            except CloudFailure as failure:
                self._failed(failure)
                return
            except LeaseLost:
                self._token = None
                self.waiting = "the cloud replayer's lease passed to another server"
                log.warning("cloud replayer lease lost: writes stopped", extra=self._lease_log())
                return
            self._retry_delay = 0.0
            self.waiting = ""

    # The lease: one replayer for the servers sharing this outbox (cloud/lease.py)
    def _lease_log(self) -> dict[str, object]:
        return {"lease": self.lease.name, "holder": self.lease.holder, "token": self._token}

    def _hold_lease(self) -> bool:
        """Take or renew the lease (one statement; the keeper also renews it on a timer).
        A takeover starts from what the store and the cloud say, not from memory: the
        last holder may have saved persons, or left a training running."""
        if self._local:
            self._token = 1
            return True
        token = self.keeper.renew()
        if token is None:
            self._token = None
            self.waiting = "another server replays the outbox (it holds the lease)"
            # The holder saves the persons it makes, and their training, in the shared
            # store: follow them, so that this server's cloud answers name its members.
            # (Unreachable: the store's state says so; the local copy decides meanwhile.)
            with contextlib.suppress(StoreUnavailable):
                self.people.follow()
            return False
        if token != self._token:
            self.people.reload()
            self._started = False  # read the training state from the cloud again
            self.training, self.training_queued = Training.IDLE, False
            self._group_checked = False
            self._token = token
            log.info("cloud replayer lease held", extra=self._lease_log())
        return True

    def _fence(self) -> None:
        """Before every cloud write: the lease is still ours, with our token."""
        if self._local:
            return
        if self._token is None or not self.lease.check(self._token):
            raise LeaseLost()

    def _wait(self, why: str, longest: float, at_least: float | None = None) -> None:
        self._retry_delay = min(longest, max(FIRST_RETRY, self._retry_delay * 2))
        if at_least is not None:
            self._retry_delay = max(at_least, min(self._retry_delay, longest))
        self._retry_at = self._clock() + self._retry_delay
        self.waiting = f"{why}; retrying in {self._retry_delay:.0f} s"

    def _failed(self, failure: CloudFailure) -> None:
        if failure.code == CLIENT_RATE_LIMIT:
            # Not a failure: our own rate limit (Identify first). Resume when it allows,
            # without growing the back-off.
            self._retry_at = self._clock() + (failure.retry_after or FIRST_RETRY)
            self.waiting = "keeping to the resource's rate (Identify first)"
            return
        self.last_error = failure.detail
        self.last_error_time = time.time()
        if failure.resource_fault:
            self.health.failed(failure)
            self._wait(f"paused: {self.health.state.describe()}", MAX_CHECK)
        elif failure.outcome is EngineOutcome.THROTTLED and failure.retry_after:
            self._wait(failure.detail, max(MAX_RETRY, failure.retry_after), failure.retry_after)
        else:
            self._wait(failure.detail, MAX_RETRY)
        if failure.status is not None and "GroupNotFound" in failure.code:
            self._group_checked = False  # the group went: make it again next time
        log.warning("cloud sync paused", extra={"error": failure.detail, "why": self.waiting})

    def _ensure_group(self) -> None:
        if not self._group_checked:
            self._fence()
            if self.face.ensure_group():
                log.info("cloud group created", extra={"group": self.face.settings.group_id})
            self._group_checked = True

    # Training
    def _start_up(self) -> None:
        """Read the training state from the cloud once: a training may be running (a
        restart mid-training), or may have finished while FaceGate was down."""
        if self._started:
            return
        try:
            status, _ = self.face.training_status()
        except CloudFailure as failure:
            if not (failure.not_found or failure.outcome is EngineOutcome.NOT_TRAINED):
                raise
            status = "nonstarted"
        self._started = True
        if status == "succeeded":
            self.people.training_succeeded()  # one queued before a restart has finished
        waiting = any(not p.ready and not p.deleted for p in self.people.all())
        if status == "running":
            self._running(queued=waiting)
        elif waiting:
            self.training = Training.NEEDED

    def _changed(self) -> None:
        """The group changed: train it, after the running training if there is one."""
        if self.training is Training.RUNNING:
            self.training_queued = True
        else:
            self.training = Training.NEEDED

    def _running(self, *, queued: bool) -> None:
        self.training = Training.RUNNING
        self.training_queued = self.training_queued or queued
        self._poll_delay, _ = poll_delays(len(self.people.all()))
        self._next_poll = self._clock() + self._poll_delay

    def _delete_face(self, entry: OutboxEntry) -> None:
        """A removed photo: delete its face from the member's cloud person. Without the
        cloud's id (the add was tried but never heard back from), find it by its tag.
        Deleting twice is harmless (a face already gone is not an error)."""
        assert entry.face_id is not None
        self.store.outbox_attempt(entry.seq)
        person = self.people.person_of(entry.member_id)
        if person is None:
            return  # no person (any more): nothing holds the face
        persisted = entry.persisted_face_id
        if persisted is None:
            tag = face_tag(entry.face_id)
            persisted = next(
                (
                    p
                    for p in self.face.person_faces(person.person_id)
                    if self.face.face_tag(person.person_id, p) == tag
                ),
                None,
            )
        if persisted is not None:
            self._fence()
            self.face.delete_face(person.person_id, persisted)

    def _train(self) -> None:
        now = self._clock()
        if self.training is Training.RUNNING:
            if now < self._next_poll:
                return
            status, message = self.face.training_status()
            if status == "succeeded":
                self.people.training_succeeded()
                log.info("cloud training succeeded")
                self.training = Training.IDLE
                if self.training_queued:
                    self.training_queued = False
                    self.training = Training.NEEDED  # the one queued behind: start it now
            elif status == "failed":
                if not any(not p.deleted for p in self.people.all()):
                    # An empty group has nothing to train (the last person was deleted).
                    self.training = Training.IDLE
                    self.training_queued = False
                    return
                self.training = Training.FAILED
                self.training_queued = False
                self.last_error = f"training failed: {message}"
                self.last_error_time = time.time()
                self._next_poll = now + FAILED_TRAINING_RETRY
                log.error("cloud training failed", extra={"error": message})
                return
            else:
                _, longest = poll_delays(len(self.people.all()))
                self._poll_delay = min(longest, self._poll_delay * 1.5)
                self._next_poll = now + self._poll_delay
                return
        if self.training is Training.NEEDED or (
            self.training is Training.FAILED and now >= self._next_poll
        ):
            try:
                self._fence()
                self.face.train()
            except CloudFailure as failure:
                if not failure.training_running:
                    raise
                # One runs already (a restart mid-training, another server): ours follows.
                log.info("cloud training already running; one more queued behind it")
                self._running(queued=True)
                return
            self.people.training_queued()
            self._running(queued=False)
            log.info("cloud training queued")

    # The outbox
    def _replay_all(self) -> None:
        while not self._stop.is_set():
            entries = self.store.outbox(BATCH)
            if not entries:
                return
            for entry in entries:
                if self.face.rate.spare() < CALLS_PER_ENTRY:
                    # Do not start an entry the rate limit would cut short: its attempt
                    # would count, and an uncertain replay costs lookups.
                    raise CloudFailure(
                        EngineOutcome.THROTTLED,
                        "client-side rate limit",
                        code=CLIENT_RATE_LIMIT,
                        retry_after=CALLS_PER_ENTRY / max(self.face.rate.per_second, 1e-9),
                        engine_fault=False,
                    )
                if self._replay(entry):
                    self._changed()

    def _replay(self, entry: OutboxEntry) -> bool:
        """Replay one entry; False when it was parked (the cloud refused it)."""
        uncertain = entry.attempts > 0
        try:
            if entry.kind == "add_face":
                self._add_face(entry, uncertain)
            elif entry.kind == "delete_member":
                self._delete_member(entry)
            elif entry.kind == "delete_face":
                self._delete_face(entry)
            else:
                raise ValueError(f"unknown outbox entry kind {entry.kind!r}")
        except CloudFailure as failure:
            if failure.entry_fault:
                self.store.outbox_park(entry.seq, failure.detail)
                log.warning(
                    "cloud refused an outbox entry: parked",
                    extra={
                        "kind": entry.kind,
                        "member_id": entry.member_id,
                        "seq": entry.seq,
                        "error": failure.detail,
                    },
                )
                return False
            self.store.outbox_attempt(entry.seq, error=failure.detail)
            raise
        self.store.outbox_done(entry.seq)
        log.info(
            "cloud change replayed",
            extra={"kind": entry.kind, "member_id": entry.member_id, "seq": entry.seq},
        )
        return True

    def _create_person(self, member_id: str, uncertain: bool) -> str:
        person_id = self._find_person(member_id) if uncertain else None
        if person_id is not None:
            # An earlier create took effect with its answer lost (a time-out, a crash,
            # a holder of the lease stopped half-way): that person is the member's.
            log.info(
                "cloud person of an earlier attempt found: kept",
                extra={"member_id": member_id, "person_id": person_id},
            )
        else:
            if uncertain:
                # A create still in flight when its attempt was given up may yet land:
                # the sweep finds and deletes such a person in the background.
                self._start_sweep()
            self._fence()
            person_id = self.face.create_person(member_id)
            # Checked again before the store learns of it: a holder frozen during the
            # create (past its lease) must not record a second person for the member
            # beside the one the next holder made meanwhile. Lost, the person is left
            # unrecorded: an orphan that the next holder's lookup (an uncertain create)
            # adopts, or its sweep or `facegate sync` deletes.
            self._fence()
        self.people.save(member_id, person_id)
        if self._reconciling is not None:
            self._reconciling.seen.add(person_id)  # made after its page was read, perhaps
        return person_id

    def _find_person(self, member_id: str) -> str | None:
        """This store's person for `member_id` that FaceGate does not remember (made by an
        attempt whose answer was lost), paging through the group as reconciliation does
        (a call per 1,000 persons, until found): only for an uncertain create, so that no
        member ever gets two persons."""
        remembered = {p.person_id for p in self.people.all()}
        start: str | None = None
        while True:
            page, start = self.face.persons_page(start, PAGE)
            for info in page:
                if info.person_id not in remembered and self.face.member_of(info) == member_id:
                    return info.person_id
            if start is None:
                return None

    def _add_face(self, entry: OutboxEntry, uncertain: bool) -> None:
        assert entry.face_id is not None and entry.photo is not None
        self.store.outbox_attempt(entry.seq)
        person = self.people.person_of(entry.member_id)
        if person is None:
            person_id = self._create_person(entry.member_id, uncertain)
        else:
            person_id = person.person_id
        tag = face_tag(entry.face_id)
        try:
            if uncertain and person is not None:  # an add we never heard back from
                for persisted in self.face.person_faces(person_id):
                    if self.face.face_tag(person_id, persisted) == tag:
                        self.store.save_cloud_face(entry.face_id, persisted)
                        return
            self._fence()
            persisted = self.face.add_face(person_id, entry.photo, tag)
        except CloudFailure as failure:
            if not (failure.not_found and "GroupNotFound" not in failure.code):
                raise
            # The person FaceGate made is gone (deleted behind its back): make it again.
            log.warning(
                "cloud person missing: re-created (`facegate sync` restores its other faces"
                " from kept photos)",
                extra={"member_id": entry.member_id, "person_id": person_id},
            )
            self.people.forget(person_id)
            person_id = self._create_person(entry.member_id, uncertain=False)
            self._fence()
            persisted = self.face.add_face(person_id, entry.photo, tag)
        self.store.save_cloud_face(entry.face_id, persisted)

    def _delete_member(self, entry: OutboxEntry) -> None:
        self.store.outbox_attempt(entry.seq)
        for person in self.people.all():
            if person.member_id == entry.member_id and person.deleted:
                self._fence()
                self.face.delete_person(person.person_id)
                self.people.forget(person.person_id)
        if entry.attempts > 0:  # a create we never heard back from may have left a person
            self._start_sweep()

    # The sweep: this store's persons FaceGate does not remember (lost creates)
    def _start_sweep(self) -> None:
        if not self._sweep:
            self._sweep, self._sweep_from = True, None

    @property
    def sweeping(self) -> bool:
        return self._sweep

    def _sweep_page(self) -> None:
        """One page of the sweep (one call), when one is due."""
        if not self._sweep:
            return
        page, following = self.face.persons_page(self._sweep_from, PAGE)
        remembered = {p.person_id for p in self.people.all()}
        busy = self.store.outbox_members()
        for person in page:
            member_id = self.face.member_of(person)
            if member_id is None or person.person_id in remembered or member_id in busy:
                continue
            self._fence()
            self.face.delete_person(person.person_id)
            log.info(
                "cloud person from a lost create deleted",
                extra={"member_id": member_id, "person_id": person.person_id},
            )
        self._sweep_from = following
        self._sweep = following is not None

    # What operators see
    def cloud_state(self, member_id: str) -> str:
        """The member in the cloud, in a few words (GetMember)."""
        entries = self.store.outbox_of(member_id)
        parked = [e for e in entries if e.parked]
        if parked:
            return (
                f"{len(parked)} change(s) refused by the cloud: {parked[0].parked}"
                " (facegate sync --retry-parked)"
            )
        if entries:
            return f"{len(entries)} change(s) waiting to be sent" + (
                f" ({self.waiting})" if self.waiting else ""
            )
        person = self.people.person_of(member_id)
        if person is None:
            return "not in the cloud (facegate sync)"
        if person.ready:
            return "ready"
        return "training" if self.training is Training.RUNNING else "waiting for a training"

    # Operator actions
    def retry_parked(self) -> int:
        """Put every parked entry back in line (`facegate sync --retry-parked`)."""
        count = self.store.outbox_unpark()
        if count:
            log.info("parked cloud changes put back in line", extra={"entries": count})
            self.wake()
        return count

    def _restore(self, person_id: str, face_id: int) -> None:
        """Add a kept photo to the person: the one photo read, when it is needed."""
        photo = self.store.face_photo(face_id)
        if photo is not None:
            self._fence()
            persisted = self.face.add_face(person_id, photo, face_tag(face_id))
            self.store.save_cloud_face(face_id, persisted)

    # `facegate sync`: a reconciliation, a page per tick in the background
    def request_reconcile(self, dry_run: bool, *, report_only: bool = False) -> SyncReport:
        """Start a reconciliation, or join the running one of the same kind (one of the
        other kind is queued behind it); answer at once with it and the last finished one.
        With report_only, start nothing."""
        with self._reconcile_lock:
            if report_only:
                chosen = self._reconciling
            elif self._reconciling is None:
                chosen = self._reconciling = self._new_reconcile(dry_run)
            elif self._reconciling.dry_run == dry_run:
                chosen = self._reconciling
            else:
                if self._reconcile_queued is None:
                    self._reconcile_queued = self._new_reconcile(dry_run)
                chosen = self._reconcile_queued
            report = SyncReport(
                running=self._view(chosen) if chosen is not None else None,
                finished=self._reconciled,
            )
        if not report_only:
            self.wake()
        return report

    @property
    def reconciliation(self) -> Reconciliation | None:
        """The running reconciliation, else the last finished one (`facegate status`)."""
        with self._reconcile_lock:
            if self._reconciling is not None:
                return self._view(self._reconciling)
            return self._reconciled

    @property
    def reconciling(self) -> bool:
        return self._reconciling is not None

    def _new_reconcile(self, dry_run: bool) -> _Reconcile:
        self._reconcile_count += 1
        log.info(
            "cloud reconciliation requested",
            extra={"reconciliation": self._reconcile_count, "dry_run": dry_run},
        )
        return _Reconcile(self._reconcile_count, dry_run)

    def _view(self, r: _Reconcile) -> Reconciliation:
        queued = r is self._reconcile_queued
        return Reconciliation(
            r.reconciliation_id,
            r.dry_run,
            "queued" if queued else r.phase,
            r.persons_checked,
            r.members_checked,
            r.found,
            "" if queued else self.waiting,
        )

    def _reconcile_page(self) -> None:
        """One page of the running reconciliation: the cloud group's persons first (one
        call a page), then the store's members. A page that fails is read again at the next
        tick; what it applied before failing is reported once (the cloud no longer differs)."""
        r = self._reconciling
        if r is None:
            return
        if not r.began:
            self._group_checked = False  # the group itself may have gone
            self._ensure_group()
            r.began = True
        noted: list[Change] = []
        try:
            if r.phase == "persons":
                self._reconcile_persons(r, noted)
            else:
                self._reconcile_members(r, noted)
        except CloudFailure:
            r.note([c for c in noted if c.applied])
            raise
        r.note(noted)
        if r.phase == "done":
            self._reconciled_one(r)

    def _reconcile_persons(self, r: _Reconcile, noted: list[Change]) -> None:
        page, following = self.face.persons_page(r.cursor, PAGE)
        remembered = {p.person_id: p for p in self.people.all()}
        pending = self.store.outbox_members()
        apply = not r.dry_run
        for info in page:
            known = remembered.get(info.person_id)
            owner = known.member_id if known is not None else self.face.member_of(info)
            if owner is None:
                continue  # another store's person: never touched
            r.persons_checked += 1
            r.seen.add(info.person_id)
            if owner in pending:
                continue  # the outbox is changing it (creating, adding to or deleting it)
            if known is None or known.deleted:  # an orphan: the store does not know it
                if apply:
                    self._fence()
                    self.face.delete_person(info.person_id)
                    if known is not None:
                        self.people.forget(info.person_id)
                noted.append(
                    Change(
                        ChangeKind.ORPHAN_PERSON,
                        owner,
                        info.person_id,
                        "deleted from the cloud" if apply else "would be deleted from the cloud",
                        apply,
                    )
                )
                continue
            faces = self.store.faces(owner, photos=False)
            in_cloud = set(info.persisted_face_ids)
            known_faces = {f.persisted_face_id for f in faces if f.persisted_face_id}
            for face in faces:
                if face.persisted_face_id in in_cloud:
                    continue
                done = False
                if apply and face.photo_kept:
                    self._restore(info.person_id, face.face_id)
                    done = True
                noted.append(
                    Change(
                        ChangeKind.MISSING_FACE,
                        owner,
                        info.person_id,
                        f"face {face.face_id} is not in the cloud"
                        + ("" if face.photo_kept else " (photo not kept)"),
                        done,
                    )
                )
            for persisted in sorted(in_cloud - known_faces):
                if apply:
                    self._fence()
                    self.face.delete_face(info.person_id, persisted)
                noted.append(
                    Change(
                        ChangeKind.ORPHAN_FACE,
                        owner,
                        info.person_id,
                        f"cloud face {persisted} is not FaceGate's",
                        apply,
                    )
                )
        r.cursor = following
        if following is None:
            r.phase, r.after = "members", ""

    def _reconcile_members(self, r: _Reconcile, noted: list[Change]) -> None:
        """Members whose person the group did not hold (persons made since the group was
        paged through are counted as seen: `_create_person`)."""
        members = self.store.list_members(MEMBER_PAGE, r.after)
        if not members:
            r.phase = "done"
            return
        pending = self.store.outbox_members()
        persons = {p.member_id: p for p in self.people.all() if not p.deleted}
        apply = not r.dry_run
        for member in members:
            r.members_checked += 1
            person = persons.get(member.member_id)
            if member.member_id in pending or (person is not None and person.person_id in r.seen):
                continue
            faces = self.store.faces(member.member_id, photos=False)
            restorable = [f for f in faces if f.photo_kept]
            detail = f"no cloud person; {len(restorable)} of {len(faces)} photos kept"
            done = False
            if apply and restorable:
                if person is not None:
                    self.people.forget(person.person_id)
                person_id = self._create_person(member.member_id, uncertain=False)
                for face in restorable:
                    self._restore(person_id, face.face_id)
                done = True
            if not restorable:
                detail += ": re-enrol the member (or keep photos: FACEGATE_KEEP_PHOTOS)"
            noted.append(
                Change(
                    ChangeKind.MISSING_PERSON,
                    member.member_id,
                    person.person_id if person else "",
                    detail,
                    done,
                )
            )
        r.after = members[-1].member_id
        if len(members) < MEMBER_PAGE:
            r.phase = "done"  # the last page

    def _reconciled_one(self, r: _Reconcile) -> None:
        if any(c.applied for c in r.changes):
            self._changed()
        with self._reconcile_lock:
            self._reconciled = replace(self._view(r), waiting="", changes=tuple(r.changes))
            self._reconciling, self._reconcile_queued = self._reconcile_queued, None
        log.info(
            "cloud reconciled",
            extra={
                "reconciliation": r.reconciliation_id,
                "dry_run": r.dry_run,
                "persons": r.persons_checked,
                "members": r.members_checked,
                "changes": r.found,
                "applied": sum(c.applied for c in r.changes),
            },
        )


class _Reconcile:
    """A reconciliation's progress, kept between ticks (only the replayer's thread moves it)."""

    def __init__(self, reconciliation_id: int, dry_run: bool) -> None:
        self.reconciliation_id = reconciliation_id
        self.dry_run = dry_run
        self.began = False
        self.phase = "persons"
        self.cursor: str | None = None  # the persons page to read next
        self.after = ""  # the last member checked
        self.seen: set[str] = set()
        """This store's persons the group holds (ids only: no faces, no photos)."""
        self.persons_checked = 0
        self.members_checked = 0
        self.found = 0
        self.changes: list[Change] = []

    def note(self, changes: list[Change]) -> None:
        self.found += len(changes)
        self.changes.extend(changes[: max(0, REPORTED - len(self.changes))])
