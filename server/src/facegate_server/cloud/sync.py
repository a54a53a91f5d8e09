"""Keeping the cloud group in step with the store: the outbox replayer and `facegate sync`.

Enrolments, deletions and removed photos commit locally at once, with outbox entries in the same
transaction (store/base.py). A background thread replays the outbox in order whenever the
cloud is reachable (the circuit breaker says so), then queues one training for the whole
batch and polls it until it has finished; members become "ready" in the cloud only then,
and until then the local engine lets them in.

Replays are idempotent. Before each cloud write the entry's attempt is counted in the
store; an entry with an earlier attempt may have taken effect without FaceGate hearing of
it (a timeout, a crash, SIGKILL), so it looks before it creates: the group's persons are
searched for one whose userData is the member id, and the person's faces for one whose
userData is the entry's face tag.

`reconcile` (`facegate sync`) compares the whole group with the store and repairs what
differs: members without a person, faces missing from a person, persons and faces that
FaceGate does not know (orphans). With dry_run it only reports.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from facegate_server.cloud.azure import AzureFace, CloudFailure
from facegate_server.cloud.engine import CloudPeople
from facegate_server.domain import Change, ChangeKind, OutboxEntry
from facegate_server.routing.breaker import CircuitBreaker
from facegate_server.store import Store

log = logging.getLogger(__name__)

BATCH = 50


def face_tag(face_id: int) -> str:
    return f"facegate-face:{face_id}"


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
        breaker: CircuitBreaker,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.face = face
        self.store = store
        self.people = people
        self.breaker = breaker
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # one replay or reconcile at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._group_checked = False
        self.training = Training.IDLE
        self._next_poll = 0.0
        self._poll_delay = 1.0
        self.last_error = ""
        self.last_error_time = 0.0

    # The background thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cloud-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """Something was enrolled or deleted: replay now rather than at the next tick."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep syncing whatever happened; the next tick retries
                log.exception("cloud sync failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def run_once(self) -> None:
        """Replay what the outbox holds, then queue or poll training, if the cloud is up."""
        with self._lock:
            if not self.breaker.allow():
                return
            calls = self.face.counter.total()
            try:
                self._ensure_group()
                while not self._stop.is_set():
                    entries = self.store.outbox(BATCH)
                    if not entries:
                        break
                    for entry in entries:
                        self._replay(entry)
                        self.training = Training.NEEDED
                self._train()
            except CloudFailure as failure:
                self._failed(failure)
                return
            if self.face.counter.total() > calls:
                self.breaker.record_success()  # the cloud answered us
            else:
                self.breaker.release()  # nothing asked: no news of the cloud either way

    def _failed(self, failure: CloudFailure) -> None:
        self.last_error = failure.detail
        self.last_error_time = time.time()
        log.warning("cloud sync paused", extra={"error": failure.detail})
        self.breaker.record_failure(
            retry_after=(failure.retry_after or 0.0) if failure.status == 429 else None
        )

    def _ensure_group(self) -> None:
        if not self._group_checked:
            if self.face.ensure_group():
                log.info("cloud group created", extra={"group": self.face.settings.group_id})
            self._group_checked = True
            if any(not p.ready and not p.deleted for p in self.people.all()):
                self.training = Training.NEEDED  # a training was cut short by a restart

    def _replay(self, entry: OutboxEntry) -> None:
        uncertain = entry.attempts > 0
        try:
            if entry.kind == "add_face":
                self._add_face(entry, uncertain)
            elif entry.kind == "delete_member":
                self._delete_member(entry, uncertain)
            elif entry.kind == "delete_face":
                self._delete_face(entry)
            else:
                raise ValueError(f"unknown outbox entry kind {entry.kind!r}")
        except CloudFailure as failure:
            self.store.outbox_attempt(entry.seq, error=failure.detail)
            raise
        self.store.outbox_done(entry.seq)
        log.info(
            "cloud change replayed",
            extra={"kind": entry.kind, "member_id": entry.member_id, "seq": entry.seq},
        )

    def _find_person(self, member_id: str) -> str | None:
        remembered = {p.person_id for p in self.people.all()}
        for person in self.face.persons():
            if person.user_data == member_id and person.person_id not in remembered:
                return person.person_id
        return None

    def _add_face(self, entry: OutboxEntry, uncertain: bool) -> None:
        assert entry.face_id is not None and entry.photo is not None
        self.store.outbox_attempt(entry.seq)
        person = self.people.person_of(entry.member_id)
        if person is None:
            person_id = self._find_person(entry.member_id) if uncertain else None
            if person_id is None:
                person_id = self.face.create_person(entry.member_id)
            self.people.save(entry.member_id, person_id)
        else:
            person_id = person.person_id
        tag = face_tag(entry.face_id)
        if uncertain:  # an add we never heard back from may have taken effect
            for persisted in self.face.person_faces(person_id):
                if self.face.face_tag(person_id, persisted) == tag:
                    self.store.save_cloud_face(entry.face_id, persisted)
                    return
        persisted = self.face.add_face(person_id, entry.photo, tag)
        self.store.save_cloud_face(entry.face_id, persisted)

    def _delete_member(self, entry: OutboxEntry, uncertain: bool) -> None:
        self.store.outbox_attempt(entry.seq)
        for person in self.people.all():
            if person.member_id == entry.member_id and person.deleted:
                self.face.delete_person(person.person_id)
                self.people.forget(person.person_id)
        if uncertain:  # a create we never heard back from may have left a person behind
            orphan = self._find_person(entry.member_id)
            if orphan is not None and self.people.person_of(entry.member_id) is None:
                self.face.delete_person(orphan)

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
            self.face.delete_face(person.person_id, persisted)

    def _train(self) -> None:
        now = self._clock()
        if self.training is Training.RUNNING:
            if now < self._next_poll:
                return
            status, message = self.face.training_status()
            if status == "succeeded":
                self.people.training_succeeded()
                self.training = Training.IDLE
                log.info("cloud training succeeded")
            elif status == "failed":
                if not any(not p.deleted for p in self.people.all()):
                    # An empty group has nothing to train (the last person was deleted).
                    self.training = Training.IDLE
                    return
                self.training = Training.FAILED
                self.last_error = f"training failed: {message}"
                self.last_error_time = time.time()
                self._next_poll = now + 30.0  # retry the training after a pause
                log.error("cloud training failed", extra={"error": message})
            else:
                self._poll_delay = min(30.0, self._poll_delay * 2)
                self._next_poll = now + self._poll_delay
            return
        if self.training is Training.NEEDED or (
            self.training is Training.FAILED and now >= self._next_poll
        ):
            self.face.train()
            self.people.training_queued()
            self.training = Training.RUNNING
            self._poll_delay = 0.5
            self._next_poll = now + self._poll_delay
            log.info("cloud training queued")

    # `facegate sync`
    def reconcile(self, dry_run: bool) -> list[Change]:
        """Compare the cloud group with the store; repair the differences unless dry_run."""
        with self._lock:
            self._group_checked = False  # the group itself may have gone
            self._ensure_group()
            return self._reconcile(dry_run)

    def _reconcile(self, dry_run: bool) -> list[Change]:
        changes: list[Change] = []
        cloud = {p.person_id: p for p in self.face.persons()}
        remembered = {p.person_id: p for p in self.people.all()}
        pending = {e.member_id for e in self.store.outbox(1_000_000)}
        apply = not dry_run

        def note(kind: ChangeKind, member: str, person: str, detail: str, done: bool) -> None:
            changes.append(Change(kind, member, person, detail, done))

        # Persons the store does not know, or knows as deleted: orphans.
        for person_id, orphan in cloud.items():
            known = remembered.get(person_id)
            if known is not None and not known.deleted:
                continue
            if known is not None and known.member_id in pending:
                continue  # its deletion is waiting in the outbox
            if apply:
                self.face.delete_person(person_id)
                if known is not None:
                    self.people.forget(person_id)
            note(
                ChangeKind.ORPHAN_PERSON,
                orphan.user_data,
                person_id,
                "deleted from the cloud" if apply else "would be deleted from the cloud",
                apply,
            )

        # Members whose person or faces are missing in the cloud.
        after = ""
        while True:
            members = self.store.list_members(1000, after)
            if not members:
                break
            after = members[-1].member_id
            for member in members:
                if member.member_id in pending:
                    continue  # the outbox will create it
                person = self.people.person_of(member.member_id)
                faces = self.store.faces(member.member_id)
                info = cloud.get(person.person_id) if person is not None else None
                restorable = [f for f in faces if f.photo is not None]
                if info is None:
                    detail = f"no cloud person; {len(restorable)} of {len(faces)} photos kept"
                    done = False
                    if apply and restorable:
                        if person is not None:
                            self.people.forget(person.person_id)
                        person_id = self.face.create_person(member.member_id)
                        self.people.save(member.member_id, person_id)
                        for face in restorable:
                            assert face.photo is not None
                            persisted = self.face.add_face(
                                person_id, face.photo, face_tag(face.face_id)
                            )
                            self.store.save_cloud_face(face.face_id, persisted)
                        done = True
                    if not restorable:
                        detail += ": re-enrol the member (or keep photos: FACEGATE_KEEP_PHOTOS)"
                    note(
                        ChangeKind.MISSING_PERSON,
                        member.member_id,
                        person.person_id if person else "",
                        detail,
                        done,
                    )
                    continue
                assert person is not None
                in_cloud = set(info.persisted_face_ids)
                known_faces = {f.persisted_face_id for f in faces if f.persisted_face_id}
                for face in faces:
                    if face.persisted_face_id in in_cloud:
                        continue
                    done = False
                    if apply and face.photo is not None:
                        persisted = self.face.add_face(
                            person.person_id, face.photo, face_tag(face.face_id)
                        )
                        self.store.save_cloud_face(face.face_id, persisted)
                        done = True
                    note(
                        ChangeKind.MISSING_FACE,
                        member.member_id,
                        person.person_id,
                        f"face {face.face_id} is not in the cloud"
                        + ("" if face.photo is not None else " (photo not kept)"),
                        done,
                    )
                for persisted in sorted(in_cloud - known_faces):
                    if apply:
                        self.face.delete_face(person.person_id, persisted)
                    note(
                        ChangeKind.ORPHAN_FACE,
                        member.member_id,
                        person.person_id,
                        f"cloud face {persisted} is not FaceGate's",
                        apply,
                    )
        if apply and any(c.applied for c in changes):
            self.training = Training.NEEDED
            self._train()
        log.info(
            "cloud reconciled",
            extra={
                "dry_run": dry_run,
                "changes": len(changes),
                "applied": sum(c.applied for c in changes),
            },
        )
        return changes
