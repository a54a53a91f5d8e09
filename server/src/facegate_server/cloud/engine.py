"""The Azure engine (a RecognitionEngine) and the read model it decides with.

`CloudPeople` is which cloud person is which member, and whether a training that includes
the member has succeeded: kept in the store (the outbox replayer writes it there, in
cloud/sync.py) and read from memory, so that a decision never reads the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from facegate_server.cloud.azure import AzureFace, CloudFailure
from facegate_server.domain import (
    Candidate,
    CloudPerson,
    Decision,
    EngineKind,
    EngineOutcome,
    FaceTemplate,
    Identification,
    SearchResult,
)
from facegate_server.engines.base import Attempt
from facegate_server.store import Store

MIN_BYTES = 1024
"""The Face API refuses smaller images (400 InvalidImageSize): they are not sent."""
HINT_NO_FACE = "look at the camera"
HINT_MULTIPLE_FACES = "one person at a time, please"
NO_PERSON = "00000000-0000-0000-0000-000000000000"
"""The person Verify asks about for a member with no cloud person (no such member, or not
synchronised yet): the Face API answers 404, as after a real verification's round trip."""


class CloudPeople:
    """The store's cloud persons, mirrored in memory; every change goes through here."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._by_person: dict[str, CloudPerson] = {}
        self.reload()

    def reload(self) -> None:
        people = self._store.cloud_people()
        with self._lock:
            self._by_person = {p.person_id: p for p in people}

    # Reads (no store access)
    def member_of(self, person_id: str) -> str | None:
        """The current member `person_id` stands for (None: deleted, or not ours)."""
        with self._lock:
            person = self._by_person.get(person_id)
        return None if person is None or person.deleted else person.member_id

    def person_of(self, member_id: str) -> CloudPerson | None:
        with self._lock:
            for person in self._by_person.values():
                if person.member_id == member_id and not person.deleted:
                    return person
        return None

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
            self._by_person[person_id] = CloudPerson(member_id, person_id, ready=False)

    def forget(self, person_id: str) -> None:
        self._store.forget_cloud_person(person_id)
        with self._lock:
            self._by_person.pop(person_id, None)

    def member_deleted(self, member_id: str) -> None:
        """The store marked the member's person deleted (in the deletion's transaction)."""
        with self._lock:
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

    A person found is mapped back to a member through `CloudPeople`; one that maps to no
    current member (deleted a moment ago, or never ours) is an unknown face.
    """

    kind = EngineKind.AZURE
    name = "azure"

    def __init__(self, face: AzureFace, people: CloudPeople) -> None:
        self.face = face
        self.people = people

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        found, _ = self._identify(image, timeout, attempt or Attempt(), max_candidates=2)
        return found

    def _identify(
        self, image: bytes, timeout: float, attempt: Attempt, max_candidates: int
    ) -> tuple[Identification, list[tuple[str, float]]]:
        if len(image) < MIN_BYTES:
            raise CloudFailure(
                EngineOutcome.NOT_USED, "image under the Face API's 1 KB", status=400
            )
        deadline = time.monotonic() + timeout
        attempt.billed += 1
        faces = self.face.detect(image, timeout)
        if not faces:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint=HINT_NO_FACE), []
        if len(faces) > 1:
            largest = max(faces, key=lambda f: f.box.area)
            return (
                Identification(
                    Decision.DENIED_MULTIPLE_FACES,
                    self.kind,
                    face_box=largest.box,
                    hint=HINT_MULTIPLE_FACES,
                ),
                [],
            )
        remaining = deadline - time.monotonic()
        if attempt.cancelled.is_set() or remaining <= 0:
            raise CloudFailure(EngineOutcome.TIMED_OUT, "no time left to identify")
        attempt.billed += 1
        candidates = self.face.identify(faces[0].face_id, remaining, max_candidates)
        box = faces[0].box
        for person_id, confidence in candidates:
            member_id = self.people.member_of(person_id)
            if member_id is not None:
                found = Identification(
                    Decision.GRANTED,
                    self.kind,
                    member_id=member_id,
                    confidence=confidence,
                    face_box=box,
                )
                return found, candidates
        best = candidates[0][1] if candidates else 0.0
        found = Identification(
            Decision.DENIED_UNKNOWN_FACE, self.kind, confidence=best, face_box=box
        )
        return found, candidates

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        """Detect (with a face id), then verify it against the member's person: two calls.

        A member with no cloud person (no such member, or not synchronised yet) costs the
        same two calls, the second about a person that does not exist, and is answered as
        a face that is not theirs. Granted at `identify_confidence`, Identify's boundary.
        """
        attempt = attempt or Attempt()
        if len(image) < MIN_BYTES:
            raise CloudFailure(
                EngineOutcome.NOT_USED, "image under the Face API's 1 KB", status=400
            )
        deadline = time.monotonic() + timeout
        attempt.billed += 1
        faces = self.face.detect(image, timeout)
        if not faces:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint=HINT_NO_FACE)
        if len(faces) > 1:
            largest = max(faces, key=lambda f: f.box.area)
            return Identification(
                Decision.DENIED_MULTIPLE_FACES,
                self.kind,
                face_box=largest.box,
                hint=HINT_MULTIPLE_FACES,
            )
        remaining = deadline - time.monotonic()
        if attempt.cancelled.is_set() or remaining <= 0:
            raise CloudFailure(EngineOutcome.TIMED_OUT, "no time left to verify")
        person = self.people.person_of(member_id)
        attempt.billed += 1
        score = self.face.verify(
            faces[0].face_id, person.person_id if person else NO_PERSON, remaining
        )
        box = faces[0].box
        if score is not None and score >= self.face.settings.identify_confidence:
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
        """Each photo goes to the outbox with its template, for the member's cloud person."""
        return [replace(t, cloud_photo=p) for t, p in zip(templates, photos, strict=True)]

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
