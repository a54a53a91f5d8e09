"""The Azure Face engine: the only module that imports the Azure Face SDK.

FaceGate uses `azure-cognitiveservices-vision-face` (Face API v1.0) through one class,
`AzureFace`, whose methods are the handful of operations FaceGate needs; the successor SDK
(azure-ai-vision-face) would replace this one module. FaceGate keeps its members in a
LargePersonGroup (up to 1,000,000 persons, where a PersonGroup stops at 10,000; the only
kind the successor SDK keeps): each member is one person whose `userData` is the member id,
each enrolled photo one persisted face whose `userData` is FaceGate's face id, so that a
replay can find what an earlier, uncertain attempt created.

The SDK's defaults are unsafe for a gate (a 100 s timeout; three automatic retries, POSTs
included, so a retried add-face can duplicate a face): here nothing is retried by the SDK,
and every call has a connect and a read timeout. Every call is counted by operation: each
one is a paid transaction.

Every failure becomes a `CloudFailure` with an `EngineOutcome` (TIMED_OUT, THROTTLED,
NOT_TRAINED or ERROR) and a short detail: no SDK or requests exception leaves this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from facegate_server.domain import EngineOutcome, FaceBox
from facegate_server.engines.base import EngineFailure

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE = 1000  # persons per list call (the API's maximum)


@dataclass(frozen=True)
class AzureSettings:
    endpoint: str
    key: str
    group_id: str = "facegate"
    recognition_model: str = "recognition_04"
    detection_model: str = "detection_03"
    connect_timeout: float = 0.5
    read_timeout: float = 5.0
    identify_confidence: float = 0.5


class CloudFailure(EngineFailure):
    """A cloud call that did not give an answer, and why (with the HTTP status and code).

    Not the cloud's fault: the group is not trained yet, or the frame was refused (400
    InvalidImage, BadArgument): the router keeps asking the cloud.
    """

    def __init__(
        self,
        outcome: EngineOutcome,
        detail: str,
        *,
        status: int | None = None,
        code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(
            outcome,
            detail,
            retry_after=retry_after,
            engine_fault=outcome is not EngineOutcome.NOT_TRAINED and status != 400,
        )
        self.status = status
        self.code = code


@dataclass(frozen=True)
class DetectedFace:
    face_id: str
    box: FaceBox


@dataclass(frozen=True)
class CloudPersonInfo:
    person_id: str
    user_data: str
    persisted_face_ids: tuple[str, ...]


class TransactionCounter:
    """Counts cloud calls by operation (each one is a paid transaction)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: Counter[str] = Counter()

    def count(self, operation: str) -> None:
        with self._lock:
            self._totals[operation] += 1

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._totals)

    def total(self) -> int:
        with self._lock:
            return sum(self._totals.values())


def _failure(error: BaseException) -> CloudFailure:
    """Translate an SDK, msrest or requests exception into a CloudFailure."""
    import requests
    from msrest.exceptions import (  # type: ignore[attr-defined]
        ClientRequestError,
        DeserializationError,
        HttpOperationError,
    )

    if isinstance(error, HttpOperationError):
        response = error.response
        status = getattr(response, "status_code", None)
        code, message = "", str(error)
        inner = getattr(getattr(error, "error", None), "error", None)
        if inner is not None:
            code, message = getattr(inner, "code", "") or "", getattr(inner, "message", "") or ""
        detail = f"HTTP {status} {code}: {message}".strip()[:300]
        if status == 429:
            retry_after = None
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                retry_after = float(response.headers.get("Retry-After", ""))
            return CloudFailure(
                EngineOutcome.THROTTLED, detail, status=status, code=code, retry_after=retry_after
            )
        if "NotTrained" in code or "TrainingNotFinished" in code:  # 400 or 409 by the docs
            return CloudFailure(EngineOutcome.NOT_TRAINED, detail, status=status, code=code)
        if status == 408:
            return CloudFailure(EngineOutcome.TIMED_OUT, detail, status=status, code=code)
        return CloudFailure(EngineOutcome.ERROR, detail, status=status, code=code)
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, requests.exceptions.Timeout):
            return CloudFailure(
                EngineOutcome.TIMED_OUT, f"no answer in time ({type(cause).__name__})"
            )
        if isinstance(cause, requests.exceptions.ConnectionError):
            return CloudFailure(EngineOutcome.ERROR, "cannot connect to the Face API")
        cause = getattr(cause, "inner_exception", None) or cause.__cause__ or cause.__context__
        if cause is error:
            break
    if isinstance(error, DeserializationError | ValueError):
        return CloudFailure(EngineOutcome.ERROR, "the Face API answered malformed data")
    if isinstance(error, ClientRequestError):
        return CloudFailure(EngineOutcome.ERROR, f"request failed: {str(error)[:200]}")
    return CloudFailure(EngineOutcome.ERROR, f"{type(error).__name__}: {str(error)[:200]}")


class AzureFace:
    """The Face API operations FaceGate uses, on one LargePersonGroup."""

    def __init__(self, settings: AzureSettings, counter: TransactionCounter | None = None) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from azure.cognitiveservices.vision.face import FaceClient
            from msrest.authentication import CognitiveServicesCredentials

        self.settings = settings
        self.counter = counter or TransactionCounter()
        credentials = CognitiveServicesCredentials(settings.key)
        self._client = FaceClient(settings.endpoint, credentials)  # type: ignore[no-untyped-call]
        self._client.config.retry_policy.retries = 0  # we decide what is retried
        # With no retries left, urllib3 would turn a 5xx into a RetryError without its
        # status; let the SDK see the answer and raise APIErrorException instead.
        self._client.config.retry_policy.policy.raise_on_status = False
        self._client.config.connection.timeout = (  # type: ignore[assignment]
            settings.connect_timeout,
            settings.read_timeout,
        )
        self._group = self._client.large_person_group
        self._persons = self._client.large_person_group_person

    def _call(
        self,
        operation: str,
        fn: Callable[..., T],
        *args: Any,
        read_timeout: float | None = None,
        **kwargs: Any,
    ) -> T:
        timeout = (
            self.settings.connect_timeout,
            self.settings.read_timeout if read_timeout is None else max(0.05, read_timeout),
        )
        self.counter.count(operation)
        started = time.perf_counter()
        try:
            return fn(*args, timeout=timeout, **kwargs)
        except Exception as error:  # the SDK raises many kinds: all become CloudFailure
            failure = _failure(error)
            log.debug(
                "cloud call failed",
                extra={
                    "operation": operation,
                    "outcome": failure.outcome.value,
                    "detail": failure.detail,
                    "ms": round((time.perf_counter() - started) * 1000),
                },
            )
            raise failure from None

    # Recognition
    def detect(self, image: bytes, timeout: float) -> list[DetectedFace]:
        faces = self._call(
            "detect",
            self._client.face.detect_with_stream,
            io.BytesIO(image),
            return_face_id=True,
            recognition_model=self.settings.recognition_model,
            detection_model=self.settings.detection_model,
            face_id_time_to_live=60,
            read_timeout=timeout,
        )
        return [
            DetectedFace(
                str(f.face_id),
                FaceBox(
                    left=int(f.face_rectangle.left),
                    top=int(f.face_rectangle.top),
                    width=int(f.face_rectangle.width),
                    height=int(f.face_rectangle.height),
                ),
            )
            for f in faces or []
        ]

    def identify(
        self, face_id: str, timeout: float, max_candidates: int = 2
    ) -> list[tuple[str, float]]:
        """(person id, confidence) candidates, best first."""
        results = self._call(
            "identify",
            self._client.face.identify,
            [face_id],
            large_person_group_id=self.settings.group_id,
            max_num_of_candidates_returned=max_candidates,
            confidence_threshold=self.settings.identify_confidence,
            read_timeout=timeout,
        )
        candidates = [
            (str(c.person_id), float(c.confidence))
            for r in results or []
            for c in r.candidates or []
        ]
        return sorted(candidates, key=lambda c: -c[1])

    def verify(self, face_id: str, person_id: str, timeout: float) -> float | None:
        """The confidence that a detected face is the group's person `person_id` (one call).

        None when the person, or every face of theirs, is not there (404): the answer for
        a face that is not theirs, after the same call.
        """
        try:
            result = self._call(
                "verify",
                self._client.face.verify_face_to_person,
                face_id,
                person_id,
                large_person_group_id=self.settings.group_id,
                read_timeout=timeout,
            )
        except CloudFailure as failure:
            if failure.status == 404:
                return None
            raise
        return float(result.confidence)

    # The group
    def ensure_group(self) -> bool:
        """Create the group if it does not exist; True if it was created."""
        try:
            self._call("get_group", self._group.get, self.settings.group_id)
            return False
        except CloudFailure as failure:
            if failure.status != 404:
                raise
        self._call(
            "create_group",
            self._group.create,
            self.settings.group_id,
            name="FaceGate members",
            user_data="facegate",
            recognition_model=self.settings.recognition_model,
        )
        return True

    def train(self) -> None:
        self._call("train", self._group.train, self.settings.group_id)

    def training_status(self) -> tuple[str, str]:
        """(status, message): status is nonstarted, running, succeeded or failed (the API's
        spelling of "not started" is `nonstarted`)."""
        status = self._call(
            "training_status", self._group.get_training_status, self.settings.group_id
        )
        value = getattr(status.status, "value", status.status)
        return str(value).lower(), str(status.message or "")

    # Persons and faces
    def persons(self) -> Iterator[CloudPersonInfo]:
        start: str | None = None
        while True:
            page = self._call(
                "list_persons", self._persons.list, self.settings.group_id, start=start, top=PAGE
            )
            for p in page or []:
                yield CloudPersonInfo(
                    str(p.person_id),
                    str(p.user_data or ""),
                    tuple(map(str, p.persisted_face_ids or ())),
                )
            if not page or len(page) < PAGE:
                return
            start = str(page[-1].person_id)

    def person_faces(self, person_id: str) -> tuple[str, ...]:
        """The persisted face ids of one person (one call)."""
        person = self._call("get_person", self._persons.get, self.settings.group_id, person_id)
        return tuple(map(str, person.persisted_face_ids or ()))

    def create_person(self, member_id: str) -> str:
        person = self._call(
            "create_person",
            self._persons.create,
            self.settings.group_id,
            name=member_id[:128],
            user_data=member_id,
        )
        return str(person.person_id)

    def delete_person(self, person_id: str) -> None:
        """Delete a person; one that is already gone counts as deleted."""
        try:
            self._call("delete_person", self._persons.delete, self.settings.group_id, person_id)
        except CloudFailure as failure:
            if failure.status != 404:
                raise

    def add_face(self, person_id: str, photo: bytes, tag: str) -> str:
        face = self._call(
            "add_face",
            self._persons.add_face_from_stream,
            self.settings.group_id,
            person_id,
            io.BytesIO(photo),
            user_data=tag,
            detection_model=self.settings.detection_model,
        )
        return str(face.persisted_face_id)

    def face_tag(self, person_id: str, persisted_face_id: str) -> str:
        face = self._call(
            "get_face",
            self._persons.get_face,
            self.settings.group_id,
            person_id,
            persisted_face_id,
        )
        return str(face.user_data or "")

    def delete_face(self, person_id: str, persisted_face_id: str) -> None:
        try:
            self._call(
                "delete_face",
                self._persons.delete_face,
                self.settings.group_id,
                person_id,
                persisted_face_id,
            )
        except CloudFailure as failure:
            if failure.status != 404:
                raise
