"""An in-memory engine that recognises no faces: the test double of `RecognitionEngine`.

It decodes images as the local engine does (engines/images.py: the same limits and
refusals), then decides by a `faces` function that names whose face an image shows (by
default the image's SHA-256: the same bytes are the same face), so tests of roles, paging,
the access log or the router run a real server without dlib or worker processes. It keeps
the interface's contract (tests/test_engine_contract.py runs it beside the real engines).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from facegate_server.domain import (
    Candidate,
    Decision,
    EngineKind,
    FaceTemplate,
    Identification,
    SearchResult,
)
from facegate_server.engines.base import Attempt
from facegate_server.engines.images import ImageRejected, decode
from facegate_server.errors import InvalidArgument


def by_content(image: bytes) -> str | None:
    """The default `faces`: identical bytes are one face."""
    return hashlib.sha256(image).hexdigest()


class MemoryEngine:
    kind = EngineKind.LOCAL
    name = "memory"

    def __init__(
        self,
        faces: Callable[[bytes], str | None] = by_content,
        *,
        max_bytes: int = 6 * 1024 * 1024,
        max_side: int = 4096,
    ) -> None:
        self._faces = faces
        self._max_bytes, self._max_side = max_bytes, max_side
        self._lock = threading.Lock()
        # member -> the keys of its templates' embeddings (one a template). An embedding
        # stands for a face's name, so any engine given a stored template (another server
        # of a chain, one rebuilt from the store) recognises the face it stands for.
        self._members: dict[str, Counter[int]] = {}

    def _face(self, image: bytes, field: str) -> str | None:
        try:
            decode(image, max_bytes=self._max_bytes, max_side=self._max_side)
        except ImageRejected as rejected:
            raise InvalidArgument(field, rejected.message, reason=rejected.reason) from None
        return self._faces(image)

    def identify(
        self, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        face = self._face(image, "image")
        if face is None:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint="look at the camera")
        key = _key_of(face)
        with self._lock:
            owners = sorted(m for m, faces in self._members.items() if key in faces)
        if len(owners) == 1:
            return Identification(Decision.GRANTED, self.kind, member_id=owners[0], confidence=1.0)
        if owners:
            return Identification(Decision.DENIED_AMBIGUOUS, self.kind, confidence=1.0)
        return Identification(Decision.DENIED_UNKNOWN_FACE, self.kind)

    def verify(
        self, member_id: str, image: bytes, timeout: float, attempt: Attempt | None = None
    ) -> Identification:
        face = self._face(image, "image")
        if face is None:
            return Identification(Decision.DENIED_NO_FACE, self.kind, hint="look at the camera")
        with self._lock:
            theirs = _key_of(face) in self._members.get(member_id, ())
        if theirs:
            return Identification(Decision.GRANTED, self.kind, member_id=member_id, confidence=1.0)
        return Identification(Decision.DENIED_NOT_THIS_MEMBER, self.kind)

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        found = self.identify(image, timeout)
        face = self._face(image, "image")
        key = None if face is None else _key_of(face)
        with self._lock:
            owners = sorted(m for m, faces in self._members.items() if key in faces)
        candidates = [Candidate(m, 0.0, 1.0) for m in owners[:max_candidates]]
        return SearchResult(found, candidates, None)

    def enrol(
        self, photos: Sequence[bytes], timeout: float, templates: Sequence[FaceTemplate]
    ) -> list[FaceTemplate]:
        enrolled = []
        for i, (photo, template) in enumerate(zip(photos, templates, strict=True)):
            face = self._face(photo, f"photos[{i}]")
            if face is None:
                raise InvalidArgument(
                    f"photos[{i}]", "no face was found in this photo", reason="PHOTO_NO_FACE"
                )
            # A stored template needs an embedding; this one stands for the face's name.
            enrolled.append(replace(template, embedding=_embedding_of(face)))
        return enrolled

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        with self._lock:
            for t in templates:
                self._members.setdefault(member_id, Counter())[_key(t)] += 1

    def removed(self, member_id: str) -> None:
        with self._lock:
            self._members.pop(member_id, None)

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        with self._lock:
            face = _key(template)
            faces = self._members.get(member_id)
            if faces is None or faces[face] == 0:
                return
            faces[face] -= 1
            if faces[face] == 0:
                del faces[face]
            if not faces:
                del self._members[member_id]

    def knows(self, member_id: str) -> bool:
        with self._lock:
            return member_id in self._members

    def close(self) -> None:
        pass


def _embedding_of(face: str) -> np.ndarray:
    embedding = np.frombuffer(hashlib.sha256(face.encode()).digest() * 32, np.uint8)
    return embedding[:128].astype(np.float64)


def _key(template: FaceTemplate) -> int:
    assert template.embedding is not None
    return hash(np.asarray(template.embedding, np.float64).tobytes())


def _key_of(face: str) -> int:
    return hash(_embedding_of(face).tobytes())
