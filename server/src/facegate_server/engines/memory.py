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
        self._pending: dict[int, str] = {}  # id(template embedding) -> face, until enrolled
        self._members: dict[str, Counter[str]] = {}  # member -> faces (one a template)
        self._by_key: dict[int, str] = {}  # template embedding -> face, once enrolled

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
        with self._lock:
            owners = sorted(m for m, faces in self._members.items() if face in faces)
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
            theirs = face in self._members.get(member_id, ())
        if theirs:
            return Identification(Decision.GRANTED, self.kind, member_id=member_id, confidence=1.0)
        return Identification(Decision.DENIED_NOT_THIS_MEMBER, self.kind)

    def search(self, image: bytes, timeout: float, max_candidates: int) -> SearchResult:
        found = self.identify(image, timeout)
        face = self._face(image, "image")
        with self._lock:
            owners = sorted(m for m, faces in self._members.items() if face in faces)
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
            embedding = np.frombuffer(hashlib.sha256(face.encode()).digest() * 32, np.uint8)
            enrolled.append(replace(template, embedding=embedding[:128].astype(np.float64)))
            with self._lock:
                self._pending[_key(enrolled[-1])] = face
        return enrolled

    def enrolled(self, member_id: str, templates: Sequence[FaceTemplate]) -> None:
        with self._lock:
            for t in templates:
                # The same photo twice has one key: the second finds it already enrolled.
                face = self._pending.pop(_key(t), None) or self._by_key.get(_key(t))
                if face is not None:
                    self._by_key[_key(t)] = face
                    self._members.setdefault(member_id, Counter())[face] += 1

    def removed(self, member_id: str) -> None:
        with self._lock:
            self._members.pop(member_id, None)

    def template_removed(self, member_id: str, template: FaceTemplate) -> None:
        with self._lock:
            face = self._by_key.get(_key(template))
            faces = self._members.get(member_id)
            if face is None or faces is None or faces[face] == 0:
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


def _key(template: FaceTemplate) -> int:
    assert template.embedding is not None
    return hash(template.embedding.tobytes())
