"""The Azure engine (a RecognitionEngine) and the read model it decides with.

`CloudPeople` is which cloud person is which member, and whether a training that includes
the member has succeeded: kept in the store (the outbox replayer writes it there, in
cloud/sync.py) and read from memory, so that a decision never reads the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from facegate_server.cloud.azure import AzureFace, CloudFailure
from facegate_server.cloud.health import CloudHealth
from facegate_server.cloud.photos import for_cloud
from facegate_server.domain import (
    Candidate,
    CloudPerson,
    Decision,
    EngineKind,
    EngineOutcome,
    FaceBox,
    FaceTemplate,
    Identification,
    SearchResult,
)
from facegate_server.engines.base import Attempt
from facegate_server.engines.policy import choose_face
from facegate_server.errors import StoreUnavailable
from facegate_server.store import Store

log = logging.getLogger(__name__)

MIN_BYTES = 1024
"""The Face API refuses smaller images (400 InvalidImageSize): they are not sent."""
HINT_NO_FACE = "look at the camera"
HINT_MULTIPLE_FACES = "one person at a time, please"
HINT_AMBIGUOUS = "please try again"

DEFAULT_THRESHOLD = 0.5
"""Azure's documented default "same person" confidence (Identify's confidenceThreshold)."""
DEFAULT_MARGIN = 0.10
"""FACEGATE_MATCH_MARGIN's rule in the cloud's terms. Locally, a grant needs the runner-up
member 0.10 farther (in descriptor distance) than the best; through the confidence map of
engines/policy.py, 0.10 of distance at a typical same-person distance (0.35 → 0.92,
0.45 → 0.82) is 0.10 of confidence. Azure's scale is not ours, so it is a setting
(FACEGATE_AZURE_MARGIN); 0.10 keeps the rule's intent: two people the cloud cannot tell
apart are not a grant."""
NO_PERSON = "00000000-0000-0000-0000-000000000000"
"""The person Verify asks about for a member with no cloud person (no such member, or not
synchronised yet): the Face API answers 404, as after a real verification's round trip."""


@dataclass(frozen=True)
class _Detected:
    """The face Identify or Verify asks the cloud about, and when detect was sent."""

    face_id: str
    box: FaceBox
    started: float


class CloudPeople:
    """The store's cloud persons, mirrored in memory; every change goes through here."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._by_person: dict[str, CloudPerson] = {}
        self._current: dict[str, CloudPerson] = {}  # member id -> its person, not deleted
        self._version: int | None = None  # the store's cloud_people_version at the load
        try:
            self.reload()
        except StoreUnavailable:
            # A chain's server starting while PostgreSQL is down: no cloud person is known
            # (the cloud's answers fall to the local engine) until a reload succeeds.
            log.warning("cloud persons not loaded: the shared store is unreachable")

    def reload(self) -> None:
        version = self._store.cloud_people_version()  # first: a change after it reloads again
        people = self._store.cloud_people()
        with self._lock:
            self._by_person = {p.person_id: p for p in people}
            self._current = {p.member_id: p for p in people if not p.deleted}
            self._version = version

    def follow(self) -> None:
        """Reload when another server (the lease holder) changed the persons since the last
        load: one small read when nothing changed, not every person every tick."""
        version = self._store.cloud_people_version()
        with self._lock:
            unchanged = version is not None and version == self._version
        if not unchanged:
            self.reload()

    # Reads (no store access)
    def member_of(self, person_id: str) -> str | None:
        """The current member `person_id` stands for (None: deleted, or not ours)."""
        with self._lock:
            person = self._by_person.get(person_id)
        return None if person is None or person.deleted else person.member_id

    def person_of(self, member_id: str) -> CloudPerson | None:
        with self._lock:
            return self._current.get(member_id)

    def ready(self, member_id: str) -> bool:
        person = self.person_of(member_id)
        return person is not None and person.ready

    def all(self) -> list[CloudPerson]:
        with self._lock:
            return list(self._by_person.values())

    # Changes (the store first, then memory)
    def save(self, member_id: str, person_id: str) -> None:
        self._store.save_cloud_person(member_id, person_id)
        with self._lock:
            person = CloudPerson(member_id, person_id, ready=False)
            self._by_person[person_id] = self._current[member_id] = person

    def forget(self, person_id: str) -> None:
        self._store.forget_cloud_person(person_id)
        with self._lock:
            person = self._by_person.pop(person_id, None)
            if person is not None and self._current.get(person.member_id) is person:
                del self._current[person.member_id]

    def member_deleted(self, member_id: str) -> None:
        """The store marked the member's person deleted (in the deletion's transaction)."""
        with self._lock:
            self._current.pop(member_id, None)
            for person_id, person in self._by_person.items():
                if person.member_id == member_id:
                    self._by_person[person_id] = replace(person, deleted=True, ready=False)

    def training_queued(self) -> None:
        self._store.training_queued()

    def training_succeeded(self) -> None:
        self._store.training_succeeded()
        self.reload()


class AzureEngine:
    """Identify through Azure: detect (with a face id), then identify in the group.

    A cloud answer is never a runner-up's grant: when the top candidate is not a current
    member of this store (deleted since the last training, or another store's person), the
    cloud's answer counts as no answer (a NOT_USED failure that is not the cloud's fault)
    and the local engine decides. A grant needs the top candidate at or above `threshold`
    and every other candidate at least `margin` below it (else DENIED_AMBIGUOUS). Of
    several faces, the dominant one is decided on (engines/policy.choose_face), as the
    local engine does. An OFF cloud (cloud/health.py) costs nothing: no call is made.
    """

    kind = EngineKind.AZURE
    name = "azure"

    def __init__(
        self,
        face: AzureFace,
        people: CloudPeople,
        *,
        health: CloudHealth | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        margin: float = DEFAULT_MARGIN,
        dominant_face_ratio: float | None = 4.0,
    ) -> None:
        self.face = face
        self.people = people
        self.health = health or CloudHealth()
        self.threshold = threshold
        self.margin = margin
        self.dominant_face_ratio = dominant_face_ratio

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        found, _ = self._identify(image, timeout, attempt or Attempt(), max_candidates=2)
        return found

    def _identify(
        self, image: bytes, timeout: float, attempt: Attempt, max_candidates: int
    ) -> tuple[Identification, list[tuple[str, float]]]:
        face = self._detect(image, timeout, attempt)
        if isinstance(face, Identification):
            return face, []
        remaining = timeout - (time.monotonic() - face.started)
        if attempt.cancelled.is_set() or remaining <= 0:
            raise CloudFailure(EngineOutcome.TIMED_OUT, "no time left to identify")
        attempt.billed += 1
        try:
            candidates = self.face.identify(face.face_id, remaining, max(2, max_candidates))
        except CloudFailure as failure:
            self.health.failed(failure)
            raise
        return self._decide(candidates, face.box), candidates

    def _detect(self, image: bytes, timeout: float, attempt: Attempt) -> _Detected | Identification:
        """The first call of Identify and Verify: the face to ask about, or the decision
        the frame already gets (no face, several faces). Nothing is sent under the Face
        API's 1 KB or while the cloud is off; a failure is told to the readiness check."""
        if len(image) < MIN_BYTES:
            raise CloudFailure(
                EngineOutcome.NOT_USED, "image under the Face API's 1 KB", status=400
            )
        if self.health.off:
            raise CloudFailure(
                EngineOutcome.NOT_USED,
                f"cloud off: {self.health.state.reason}",
                engine_fault=False,
            )
        started = time.monotonic()
        attempt.billed += 1
        try:
            faces = self.face.detect(image, timeout)
        except CloudFailure as failure:
            self.health.failed(failure, frame=image if failure.limited_access else None)
            raise
        if not faces:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint=HINT_NO_FACE)
        chosen = choose_face([f.box for f in faces], self.dominant_face_ratio)
        if chosen is None:
            largest = max(faces, key=lambda f: f.box.area)
            return Identification(
                Decision.DENIED_MULTIPLE_FACES,
                self.kind,
                face_box=largest.box,
                hint=HINT_MULTIPLE_FACES,
            )
        return _Detected(faces[chosen].face_id, faces[chosen].box, started)

    def _decide(self, candidates: list[tuple[str, float]], box: FaceBox) -> Identification:
        if not candidates or candidates[0][1] < self.threshold:
            best = candidates[0][1] if candidates else 0.0
            return Identification(
                Decision.DENIED_UNKNOWN_FACE, self.kind, confidence=best, face_box=box
            )
        person_id, confidence = candidates[0]
        member_id = self.people.member_of(person_id)
        if member_id is None:
            # Deleted since the last training, or not this store's: never grant whoever
            # comes next. The local engine decides.
            raise CloudFailure(
                EngineOutcome.NOT_USED,
                "the cloud's best match is not a current member (deleted since the last"
                " training, or another store's person)",
                engine_fault=False,
            )
        runner_up = candidates[1][1] if len(candidates) > 1 else 0.0
        if confidence - runner_up < self.margin:
            return Identification(
                Decision.DENIED_AMBIGUOUS,
                self.kind,
                confidence=confidence,
                face_box=box,
                hint=HINT_AMBIGUOUS,
            )
        return Identification(
            Decision.GRANTED, self.kind, member_id=member_id, confidence=confidence, face_box=box
        )

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        """Detect (with a face id), then verify it against the member's person: two calls.

        A member with no cloud person (no such member, or not synchronised yet) costs the
        same two calls, the second about a person that does not exist, and is answered as
        a face that is not theirs. Granted at `threshold`, Identify's boundary; an OFF
        cloud costs nothing; of several faces, the dominant one is verified.
        """
        attempt = attempt or Attempt()
        face = self._detect(image, timeout, attempt)
        if isinstance(face, Identification):
            return face
        remaining = timeout - (time.monotonic() - face.started)
        if attempt.cancelled.is_set() or remaining <= 0:
            raise CloudFailure(EngineOutcome.TIMED_OUT, "no time left to verify")
        person = self.people.person_of(member_id)
        attempt.billed += 1
        try:
            score = self.face.verify(
                face.face_id, person.person_id if person else NO_PERSON, remaining
            )
        except CloudFailure as failure:
            self.health.failed(failure)
            raise
        box = face.box
        if score is not None and score >= self.threshold:
            return Identification(
                Decision.GRANTED, self.kind, member_id=member_id, confidence=score, face_box=box
            )
        return Identification(
            Decision.DENIED_NOT_THIS_MEMBER, self.kind, confidence=score or 0.0, face_box=box
        )

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        """The cloud's decision and its candidates (Azure reports no distance: 0)."""
        found, candidates = self._identify(image, timeout, Attempt(), max(1, max_candidates))
        named = [
            Candidate(member_id, 0.0, confidence)
            for person_id, confidence in candidates
            if (member_id := self.people.member_of(person_id)) is not None
        ]
        return SearchResult(found, named[:max_candidates], None)

    def enrol(
        self, photos: Sequence[bytes], timeout: float, templates: Sequence[FaceTemplate]
    ) -> list[FaceTemplate]:
        """Each photo goes to the outbox with its template, for the member's cloud person,
        converted first when the Face API would not take it as it is (cloud/photos.py)."""
        return [
            replace(t, cloud_photo=for_cloud(p)) for t, p in zip(templates, photos, strict=True)
        ]

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        """Nothing to do now: the outbox replayer adds the faces and trains the group."""

    def removed(self, member_id: str) -> None:
        self.people.member_deleted(member_id)

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        """Nothing to do now: the outbox replayer deletes the face from the member's cloud
        person ("delete_face") and trains the group again."""

    def knows(self, member_id: str) -> bool:
        return self.people.ready(member_id)

    def close(self) -> None:
        pass
