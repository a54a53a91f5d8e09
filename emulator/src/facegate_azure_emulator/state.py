"""What the emulated Face resource holds: person groups, persons, faces, faceIds, training.

Plain Python, no HTTP: the Face API layer validates requests and calls these methods on
the event loop's thread (one at a time). Time comes from an injected clock (seconds since
the epoch), so tests can expire faceIds and finish training without sleeping.

Rules kept from the service:
- faceIds from Detect expire after their time to live (default 24 h); persistedFaceIds
  and personIds are permanent.
- Training is asynchronous: `nonstarted` for `training_queue_seconds`, then `running` for
  `training_seconds`, then `succeeded` (or `failed` when the group has no face at all).
  Train while a training is queued or running is refused (409 ...TrainingNotFinished).
  Identify answers from the group as of the last successful training (a snapshot): a
  person or face added since does not count until the group is trained again; persons
  deleted since come back as candidates only with `snapshot_keeps_deleted`. A group with
  no successful training is refused with 409 ...TrainingNotFinished while its first
  training runs, and 400 ...NotTrained otherwise.
- Deleting a person, or a group, while a face is being added to it: 409
  ConcurrentOperationConflict (the error-code table's common errors).
- At most 248 faces a person; persons per group by tier (`Limits`): over them, 403
  QuotaExceeded.

State can be saved to JSON (`to_json`) and loaded from it (`load_json`); detected faceIds
are not saved (they are short-lived by design).
"""

from __future__ import annotations

import base64
import heapq
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from facegate_server.domain import Embedding

from facegate_azure_emulator.errors import FaceApiError
from facegate_azure_emulator.recognizer import confidence

STATE_FORMAT = "facegate-azure-emulator-state/1"


class GroupKind(Enum):
    PERSON_GROUP = "persongroups"
    LARGE_PERSON_GROUP = "largepersongroups"

    @property
    def prefix(self) -> str:
        """The error codes' prefix: PersonGroupNotFound, LargePersonGroupNotFound, ..."""
        return "PersonGroup" if self is GroupKind.PERSON_GROUP else "LargePersonGroup"

    @property
    def label(self) -> str:
        return "Person group" if self is GroupKind.PERSON_GROUP else "Large person group"

    @property
    def id_field(self) -> str:
        return "personGroupId" if self is GroupKind.PERSON_GROUP else "largePersonGroupId"

    def not_found(self, message: str | None = None) -> FaceApiError:
        return FaceApiError(404, f"{self.prefix}NotFound", message or f"{self.label} is not found.")


@dataclass(frozen=True)
class Limits:
    persons_per_person_group: int = 10_000
    persons_per_large_person_group: int = 1_000_000
    faces_per_person: int = 248

    def persons(self, kind: GroupKind) -> int:
        if kind is GroupKind.PERSON_GROUP:
            return self.persons_per_person_group
        return self.persons_per_large_person_group


@dataclass
class PersistedFace:
    face_id: str
    embedding: Embedding
    user_data: str | None = None


@dataclass
class Person:
    person_id: str
    name: str
    user_data: str | None = None
    faces: dict[str, PersistedFace] = field(default_factory=dict)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"personId": self.person_id, "name": self.name}
        if self.user_data is not None:
            out["userData"] = self.user_data
        out["persistedFaceIds"] = list(self.faces)
        return out


@dataclass(frozen=True)
class TrainedModel:
    """The faces as of one training: rows of `matrix` grouped by person."""

    person_ids: tuple[str, ...]
    starts: npt.NDArray[np.intp]
    """Index of each person's first row in `matrix`."""
    matrix: npt.NDArray[np.float64]
    trained_at: float

    def closest(self, embedding: Embedding) -> npt.NDArray[np.float64]:
        """Each person's distance: that of their closest face."""
        distances = np.linalg.norm(self.matrix - embedding, axis=1)
        return np.minimum.reduceat(distances, self.starts)


@dataclass
class Training:
    queued_at: float
    starts_at: float
    ends_at: float
    model: TrainedModel | None
    """What the training produces once it ends; None when it fails."""
    message: str | None = None


@dataclass
class Group:
    kind: GroupKind
    group_id: str
    name: str
    user_data: str | None
    recognition_model: str
    created_at: float
    persons: dict[str, Person] = field(default_factory=dict)
    training: Training | None = None
    prior_model: TrainedModel | None = None
    """The last successful model from before `training` was queued."""

    def to_api(self, *, with_model: bool) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind.id_field: self.group_id, "name": self.name}
        if self.user_data is not None:
            out["userData"] = self.user_data
        if with_model:
            out["recognitionModel"] = self.recognition_model
        return out

    def model_at(self, now: float) -> TrainedModel | None:
        t = self.training
        if t is not None and now >= t.ends_at and t.model is not None:
            return t.model
        return self.prior_model

    def training_in_progress(self, now: float) -> bool:
        return self.training is not None and now < self.training.ends_at


@dataclass
class DetectedFace:
    face_id: str
    embedding: Embedding
    recognition_model: str
    expires_at: float


def iso(t: float) -> str:
    """A UTC date-time as the service writes it (ISO 8601, milliseconds, Z)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_id() -> str:
    return str(uuid.uuid4())


class FaceState:
    """The emulated resource. Not thread-safe: call it from the event loop only."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        limits: Limits | None = None,
        training_seconds: float = 1.0,
        training_queue_seconds: float = 0.0,
        match_threshold: float = 0.6,
    ) -> None:
        if training_seconds < 0 or training_queue_seconds < 0:
            raise ValueError("training times must be >= 0")
        if match_threshold <= 0:
            raise ValueError("match_threshold must be > 0")
        self.clock = clock
        self.limits = limits or Limits()
        self.training_seconds = training_seconds
        self.training_queue_seconds = training_queue_seconds
        self.match_threshold = match_threshold
        self.snapshot_keeps_deleted = False
        """Whether persons deleted since the last training still come back from Identify
        (the documentation does not say; FaceGate must be safe either way)."""
        self.groups: dict[GroupKind, dict[str, Group]] = {kind: {} for kind in GroupKind}
        self._writing: Counter[tuple[GroupKind, str, str]] = Counter()
        """Faces being added (analysed) now, by (kind, group, person)."""
        self._detected: dict[str, DetectedFace] = {}
        self._expiry: list[tuple[float, str]] = []
        self.version = 0
        """Bumped by every change worth saving (not by Detect)."""

    def _changed(self) -> None:
        self.version += 1

    def clear(self) -> None:
        self.groups = {kind: {} for kind in GroupKind}
        self._detected.clear()
        self._expiry.clear()
        self._changed()

    # ---- groups -------------------------------------------------------------------

    def create_group(
        self,
        kind: GroupKind,
        group_id: str,
        *,
        name: str,
        user_data: str | None,
        recognition_model: str,
    ) -> Group:
        groups = self.groups[kind]
        if group_id in groups:
            raise FaceApiError(409, f"{kind.prefix}Exists", f"{kind.label} already exists.")
        group = Group(kind, group_id, name, user_data, recognition_model, self.clock())
        groups[group_id] = group
        self._changed()
        return group

    def group(self, kind: GroupKind, group_id: str) -> Group:
        try:
            return self.groups[kind][group_id]
        except KeyError:
            raise kind.not_found() from None

    def list_groups(self, kind: GroupKind, *, start: str | None, top: int) -> list[Group]:
        ids = sorted(i for i in self.groups[kind] if start is None or i > start)
        return [self.groups[kind][i] for i in ids[:top]]

    def update_group(
        self, kind: GroupKind, group_id: str, *, name: str | None, user_data: str | None
    ) -> None:
        group = self.group(kind, group_id)
        if name is not None:
            group.name = name
        if user_data is not None:
            group.user_data = user_data
        self._changed()

    def delete_group(self, kind: GroupKind, group_id: str) -> None:
        self.group(kind, group_id)
        if any(k == kind and g == group_id for k, g, _ in +self._writing):
            raise _conflict(group_id)
        del self.groups[kind][group_id]
        self._changed()

    # ---- training -----------------------------------------------------------------

    def train(self, kind: GroupKind, group_id: str) -> None:
        """Queue a training of the group's current faces; 409 while one is in progress."""
        group = self.group(kind, group_id)
        now = self.clock()
        if group.training_in_progress(now):
            raise _training_not_finished(kind)
        previous = group.training
        if previous is not None and now >= previous.ends_at and previous.model is not None:
            group.prior_model = previous.model
        starts_at = now + self.training_queue_seconds
        ends_at = starts_at + self.training_seconds
        model = _snapshot(group.persons.values(), ends_at)
        group.training = Training(
            queued_at=now,
            starts_at=starts_at,
            ends_at=ends_at,
            model=model,
            message=None if model is not None else "There is no face in the group to train.",
        )
        self._changed()

    def training_status(self, kind: GroupKind, group_id: str) -> dict[str, Any]:
        group = self.group(kind, group_id)
        t = group.training
        if t is None:
            raise FaceApiError(404, f"{kind.prefix}NotTrained", f"{kind.label} not trained.")
        now = self.clock()
        if now < t.starts_at:
            status, last_action = "nonstarted", t.queued_at
        elif now < t.ends_at:
            status, last_action = "running", t.starts_at
        else:
            status, last_action = ("succeeded" if t.model else "failed"), t.ends_at
        out: dict[str, Any] = {
            "status": status,
            "createdDateTime": iso(group.created_at),
            "lastActionDateTime": iso(last_action),
        }
        model = group.model_at(now)
        if model is not None:
            out["lastSuccessfulTrainingDateTime"] = iso(model.trained_at)
        if status == "failed" and t.message:
            out["message"] = t.message
        return out

    # ---- persons and their faces --------------------------------------------------

    def create_person(
        self, kind: GroupKind, group_id: str, *, name: str, user_data: str | None
    ) -> Person:
        group = self.group(kind, group_id)
        if len(group.persons) >= self.limits.persons(kind):
            raise FaceApiError(
                403, "QuotaExceeded", f"Person number reached {kind.label.lower()} level limit."
            )
        person = Person(new_id(), name, user_data)
        group.persons[person.person_id] = person
        self._changed()
        return person

    def person(self, kind: GroupKind, group_id: str, person_id: str) -> Person:
        group = self.group(kind, group_id)
        try:
            return group.persons[person_id]
        except KeyError:
            raise FaceApiError(404, "PersonNotFound", f"Person {person_id} is not found.") from None

    def list_persons(
        self, kind: GroupKind, group_id: str, *, start: str | None, top: int
    ) -> list[Person]:
        group = self.group(kind, group_id)
        ids = sorted(i for i in group.persons if start is None or i > start)
        return [group.persons[i] for i in ids[:top]]

    def update_person(
        self,
        kind: GroupKind,
        group_id: str,
        person_id: str,
        *,
        name: str | None,
        user_data: str | None,
    ) -> None:
        person = self.person(kind, group_id, person_id)
        if name is not None:
            person.name = name
        if user_data is not None:
            person.user_data = user_data
        self._changed()

    def delete_person(self, kind: GroupKind, group_id: str, person_id: str) -> None:
        self.person(kind, group_id, person_id)
        if self._writing[(kind, group_id, person_id)]:
            raise _conflict(person_id)
        del self.groups[kind][group_id].persons[person_id]
        self._changed()

    @contextmanager
    def adding_face(self, kind: GroupKind, group_id: str, person_id: str) -> Iterator[None]:
        """While a face is being added to the person (its image analysed)."""
        key = (kind, group_id, person_id)
        self._writing[key] += 1
        try:
            yield
        finally:
            self._writing[key] -= 1

    def check_face_room(self, kind: GroupKind, group_id: str, person_id: str) -> Person:
        person = self.person(kind, group_id, person_id)
        if len(person.faces) >= self.limits.faces_per_person:
            raise FaceApiError(403, "QuotaExceeded", "Persisted face number reached limit.")
        return person

    def add_face(
        self,
        kind: GroupKind,
        group_id: str,
        person_id: str,
        embedding: Embedding,
        *,
        user_data: str | None,
    ) -> PersistedFace:
        person = self.check_face_room(kind, group_id, person_id)
        face = PersistedFace(new_id(), embedding, user_data)
        person.faces[face.face_id] = face
        self._changed()
        return face

    def face(
        self, kind: GroupKind, group_id: str, person_id: str, persisted_face_id: str
    ) -> PersistedFace:
        person = self.person(kind, group_id, person_id)
        try:
            return person.faces[persisted_face_id]
        except KeyError:
            raise FaceApiError(
                404, "PersistedFaceNotFound", f"Persisted face {persisted_face_id} is not found."
            ) from None

    def update_face(
        self,
        kind: GroupKind,
        group_id: str,
        person_id: str,
        persisted_face_id: str,
        *,
        user_data: str | None,
    ) -> None:
        self.face(kind, group_id, person_id, persisted_face_id).user_data = user_data
        self._changed()

    def delete_face(
        self, kind: GroupKind, group_id: str, person_id: str, persisted_face_id: str
    ) -> None:
        self.face(kind, group_id, person_id, persisted_face_id)
        del self.groups[kind][group_id].persons[person_id].faces[persisted_face_id]
        self._changed()

    # ---- detected faces (faceIds) ---------------------------------------------------

    def remember(self, embedding: Embedding, *, recognition_model: str, ttl: float) -> str:
        """Keep a detected face's embedding under a new faceId for `ttl` seconds."""
        now = self.clock()
        self._prune(now)
        face = DetectedFace(new_id(), embedding, recognition_model, now + ttl)
        self._detected[face.face_id] = face
        heapq.heappush(self._expiry, (face.expires_at, face.face_id))
        return face.face_id

    def detected(self, face_id: str) -> DetectedFace | None:
        """The detected face under `face_id`, or None if unknown or expired."""
        self._prune(self.clock())
        return self._detected.get(face_id)

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, face_id = heapq.heappop(self._expiry)
            self._detected.pop(face_id, None)

    @property
    def detected_count(self) -> int:
        return len(self._detected)

    # ---- recognition ----------------------------------------------------------------

    def identify(
        self,
        kind: GroupKind,
        group_id: str,
        faces: list[DetectedFace],
        *,
        max_candidates: int,
        threshold: float,
    ) -> list[dict[str, Any]]:
        group = self.groups[kind].get(group_id)
        if group is None:
            # Identify names a missing group with 400, not 404 (the error-code table).
            raise FaceApiError(400, f"{kind.prefix}NotFound", f"{kind.label} is not found.")
        for face in faces:
            if face.recognition_model != group.recognition_model:
                raise FaceApiError(400, "BadArgument", "'recognitionModel' is incompatible.")
        now = self.clock()
        model = group.model_at(now)
        if model is None and group.training_in_progress(now):
            raise _training_not_finished(kind)
        if model is None:
            raise FaceApiError(400, f"{kind.prefix}NotTrained", f"{kind.label} not trained.")
        results = []
        for face in faces:
            scores = [
                (confidence(float(d), self.match_threshold), pid)
                for pid, d in zip(model.person_ids, model.closest(face.embedding), strict=True)
                if self.snapshot_keeps_deleted or pid in group.persons
            ]
            scores.sort(reverse=True)
            candidates = [
                {"personId": pid, "confidence": round(conf, 5)}
                for conf, pid in scores[:max_candidates]
                if conf >= threshold
            ]
            results.append({"faceId": face.face_id, "candidates": candidates})
        return results

    def verify(self, first: DetectedFace, second: DetectedFace) -> dict[str, Any]:
        if first.recognition_model != second.recognition_model:
            raise FaceApiError(400, "BadArgument", "'recognitionModel' is incompatible.")
        distance = float(np.linalg.norm(first.embedding - second.embedding))
        return self._verdict(distance)

    def verify_person(
        self, face: DetectedFace, kind: GroupKind, group_id: str, person_id: str
    ) -> dict[str, Any]:
        group = self.groups[kind].get(group_id)
        if group is None:
            raise FaceApiError(400, f"{kind.prefix}NotFound", f"{kind.label} is not found.")
        if face.recognition_model != group.recognition_model:
            raise FaceApiError(400, "BadArgument", "'recognitionModel' is incompatible.")
        person = group.persons.get(person_id)
        if person is None:
            raise FaceApiError(404, "PersonNotFound", "Person is not found.")
        if not person.faces:
            raise FaceApiError(
                404, "PersistedFaceNotFound", "No persisted face of the person is found."
            )
        matrix = np.stack([f.embedding for f in person.faces.values()])
        distance = float(np.min(np.linalg.norm(matrix - face.embedding, axis=1)))
        return self._verdict(distance)

    def _verdict(self, distance: float) -> dict[str, Any]:
        conf = confidence(distance, self.match_threshold)
        return {"isIdentical": conf >= 0.5, "confidence": round(conf, 5)}

    # ---- saving and loading -----------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "groups": [
                _group_to_json(group) for kind in GroupKind for group in self.groups[kind].values()
            ],
        }

    def load_json(self, data: dict[str, Any]) -> None:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"not an emulator state file (format {data.get('format')!r})")
        groups: dict[GroupKind, dict[str, Group]] = {kind: {} for kind in GroupKind}
        for raw in data["groups"]:
            group = _group_from_json(raw)
            groups[group.kind][group.group_id] = group
        self.groups = groups
        self._changed()


def _training_not_finished(kind: GroupKind) -> FaceApiError:
    return FaceApiError(
        409, f"{kind.prefix}TrainingNotFinished", f"{kind.label} is under training."
    )


def _conflict(resource: str) -> FaceApiError:
    return FaceApiError(
        409,
        "ConcurrentOperationConflict",
        f"There is a conflict operation on resource {resource}, please try later.",
    )


def _snapshot(persons: Iterable[Person], trained_at: float) -> TrainedModel | None:
    person_ids: list[str] = []
    starts: list[int] = []
    rows: list[Embedding] = []
    for person in persons:
        if not person.faces:
            continue
        person_ids.append(person.person_id)
        starts.append(len(rows))
        rows.extend(face.embedding for face in person.faces.values())
    if not rows:
        return None
    return TrainedModel(
        person_ids=tuple(person_ids),
        starts=np.asarray(starts, dtype=np.intp),
        matrix=np.stack(rows).astype(np.float64),
        trained_at=trained_at,
    )


def _vec_to_json(vector: npt.NDArray[np.float64]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f8").tobytes()).decode("ascii")


def _vec_from_json(text: str) -> npt.NDArray[np.float64]:
    return np.frombuffer(base64.b64decode(text), dtype="<f8").astype(np.float64)


def _model_to_json(model: TrainedModel | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {
        "personIds": list(model.person_ids),
        "starts": [int(s) for s in model.starts],
        "rows": [_vec_to_json(row) for row in model.matrix],
        "trainedAt": model.trained_at,
    }


def _model_from_json(raw: dict[str, Any] | None) -> TrainedModel | None:
    if raw is None:
        return None
    return TrainedModel(
        person_ids=tuple(raw["personIds"]),
        starts=np.asarray(raw["starts"], dtype=np.intp),
        matrix=np.stack([_vec_from_json(r) for r in raw["rows"]]),
        trained_at=float(raw["trainedAt"]),
    )


def _group_to_json(group: Group) -> dict[str, Any]:
    t = group.training
    return {
        "kind": group.kind.value,
        "id": group.group_id,
        "name": group.name,
        "userData": group.user_data,
        "recognitionModel": group.recognition_model,
        "createdAt": group.created_at,
        "persons": [
            {
                "id": p.person_id,
                "name": p.name,
                "userData": p.user_data,
                "faces": [
                    {
                        "id": f.face_id,
                        "userData": f.user_data,
                        "embedding": _vec_to_json(f.embedding),
                    }
                    for f in p.faces.values()
                ],
            }
            for p in group.persons.values()
        ],
        "training": None
        if t is None
        else {
            "queuedAt": t.queued_at,
            "startsAt": t.starts_at,
            "endsAt": t.ends_at,
            "model": _model_to_json(t.model),
            "message": t.message,
        },
        "priorModel": _model_to_json(group.prior_model),
    }


def _group_from_json(raw: dict[str, Any]) -> Group:
    group = Group(
        kind=GroupKind(raw["kind"]),
        group_id=raw["id"],
        name=raw["name"],
        user_data=raw["userData"],
        recognition_model=raw["recognitionModel"],
        created_at=float(raw["createdAt"]),
    )
    for p in raw["persons"]:
        person = Person(p["id"], p["name"], p["userData"])
        for f in p["faces"]:
            person.faces[f["id"]] = PersistedFace(
                f["id"], _vec_from_json(f["embedding"]), f["userData"]
            )
        group.persons[person.person_id] = person
    t = raw["training"]
    if t is not None:
        group.training = Training(
            queued_at=float(t["queuedAt"]),
            starts_at=float(t["startsAt"]),
            ends_at=float(t["endsAt"]),
            model=_model_from_json(t["model"]),
            message=t["message"],
        )
    group.prior_model = _model_from_json(raw["priorModel"])
    return group
