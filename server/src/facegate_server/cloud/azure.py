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
The error body is read from the response itself, not only from the SDK's `APIError` model,
which has no `innererror` (where the field form of a Limited Access refusal puts
`UnsupportedFeature`) and no `statusCode` (which some 403 and 429 bodies carry instead of
`code`). A CloudFailure says whose fault it is: the request's own (`entry_fault`: a photo
the cloud refuses), the resource's (`resource_fault`: the key, the quota, Limited Access),
or the moment's (the rest: time-outs, 5xx, 429, unreachable).

Every person this module creates carries its store's tag in `userData`
(`facegate:<store id>:<member id>`): `member_of_data` reads it back, and a person another
store made is never taken for one of ours.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from facegate_server.cloud.ratelimit import CloudRate
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
    """The confidenceThreshold sent with Identify: candidates below it are not returned
    (the engine asks below its own threshold, to see a close runner-up)."""
    store_id: str = ""
    """The store whose persons these are (their userData's tag)."""

    @property
    def tag(self) -> str:
        return f"facegate:{self.store_id}:"


ENTRY_CODES = frozenset({"InvalidImage", "InvalidImageSize", "BadArgument", "InvalidURL"})
"""400 codes that are the request's own fault (the photo), not the resource's."""
LIMITED_ACCESS = "UnsupportedFeature"
NO_FACE_ID = "NoFaceId"  # our code: a detect that returned faces without a faceId
FULL = "QuotaExceeded"  # 403: persons per group, or faces per person, at the limit


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
        engine_fault: bool | None = None,
    ) -> None:
        if engine_fault is None:
            engine_fault = (
                outcome is not EngineOutcome.NOT_TRAINED
                and status != 400
                and code not in (LIMITED_ACCESS, NO_FACE_ID)
            )
        super().__init__(outcome, detail, retry_after=retry_after, engine_fault=engine_fault)
        self.status = status
        self.code = code

    @property
    def limited_access(self) -> bool:
        """The resource is not approved for identification (Limited Access): the cloud is
        of no use until it is (a 403 UnsupportedFeature in either form, or no faceId)."""
        return self.code in (LIMITED_ACCESS, NO_FACE_ID)

    @property
    def entry_fault(self) -> bool:
        """The request's own fault (a photo the cloud cannot take): retrying it as it is
        can never succeed, and nothing else is wrong."""
        if self.outcome is EngineOutcome.NOT_TRAINED or self.limited_access:
            return False
        if self.status == 403 and self.code == FULL:
            # The group's persons (F0: 1,000) or the person's faces (248) are at their
            # limit: this entry waits for an operator; deletions behind it still free room.
            return True
        return self.status in (413, 415) or (
            self.status == 400 and (self.code in ENTRY_CODES or not self.code)
        )

    @property
    def resource_fault(self) -> bool:
        """The resource refuses everything until an operator acts: the key (401), the
        monthly quota or Limited Access (403)."""
        return (self.status in (401, 403) and self.code != FULL) or self.limited_access

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def training_running(self) -> bool:
        return "TrainingNotFinished" in self.code


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


_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)


def _error_body(response: Any) -> tuple[str, str, str]:
    """(code, innererror code, message) read from an error answer's JSON body.

    Every documented form: `{"error": {"code", "message"}}`, with an `innererror`
    (`{"code": "InvalidRequest", ..., "innererror": {"code": "UnsupportedFeature"}}`), or
    with `statusCode` instead of `code` (quota and rate-limit answers)."""
    try:
        body = json.loads(getattr(response, "text", "") or "{}")
    except (TypeError, ValueError):
        return "", "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", ""
    code = str(error.get("code") or "")
    inner = error.get("innererror")
    inner_code = str(inner.get("code") or "") if isinstance(inner, dict) else ""
    message = str(error.get("message") or "")
    if isinstance(inner, dict) and inner.get("message"):
        message = str(inner["message"])
    return code, inner_code, message


def retry_after_of(response: Any, message: str) -> float | None:
    """A 429's wait: its Retry-After header, else the "Try again in N seconds" of its
    message, else None (the caller's own back-off applies)."""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        return max(0.0, float(response.headers.get("Retry-After", "")))
    found = _TRY_AGAIN.search(message or "")
    return float(found.group(1)) if found else None


def member_of_data(user_data: str, tag: str) -> str | None:
    """The member id of a person's userData when this store made the person, else None."""
    return user_data[len(tag) :] if user_data.startswith(tag) else None


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
        body_code, inner_code, body_message = _error_body(response)
        code = code or body_code
        message = body_message or message
        shown = code
        if inner_code:  # the field form of a refusal: InvalidRequest / UnsupportedFeature
            shown, code = f"{code}/{inner_code}" if code else inner_code, inner_code
        detail = (f"HTTP {status}" + (f" {shown}" if shown else "") + f": {message}")[:300]
        if status == 429:
            return CloudFailure(
                EngineOutcome.THROTTLED,
                detail,
                status=status,
                code=code or "RateLimitExceeded",
                retry_after=retry_after_of(response, message),
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

    def __init__(
        self,
        settings: AzureSettings,
        counter: TransactionCounter | None = None,
        rate: CloudRate | None = None,
    ) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from azure.cognitiveservices.vision.face import FaceClient
            from msrest.authentication import CognitiveServicesCredentials

        self.settings = settings
        self.counter = counter or TransactionCounter()
        self.rate = rate or CloudRate(0)
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
        urgent: bool = False,
        **kwargs: Any,
    ) -> T:
        """One paid call. `urgent` (a frame) may take the rate limit's last token."""
        timeout = (
            self.settings.connect_timeout,
            self.settings.read_timeout if read_timeout is None else max(0.05, read_timeout),
        )
        wait = self.rate.take(urgent=urgent)
        if wait > 0:
            raise CloudFailure(
                EngineOutcome.THROTTLED,
                f"client-side rate limit: next call in {wait:.1f} s",
                retry_after=wait,
                code="ClientRateLimit",  # cloud/sync.py's CLIENT_RATE_LIMIT
                engine_fault=False,
            )
        self.counter.count(operation)
        started = time.perf_counter()
        try:
            return fn(*args, timeout=timeout, **kwargs)
        except Exception as error:  # the SDK raises many kinds: all become CloudFailure
            failure = _failure(error)
            if failure.status == 429:
                self.rate.hold_off(failure.retry_after or 1.0)
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
    def detect(self, image: bytes, timeout: float, *, urgent: bool = True) -> list[DetectedFace]:
        """The faces found, each with the faceId Identify needs. A face without a faceId
        (a resource without Limited Access approval, as users report it) is a
        CloudFailure with `limited_access`: identifying it would only cost a 400."""
        faces = self._call(
            "detect",
            self._client.face.detect_with_stream,
            io.BytesIO(image),
            return_face_id=True,
            recognition_model=self.settings.recognition_model,
            detection_model=self.settings.detection_model,
            face_id_time_to_live=60,
            read_timeout=timeout,
            urgent=urgent,
        )
        if any(not f.face_id for f in faces or []):
            raise CloudFailure(
                EngineOutcome.ERROR,
                "the Face API detected a face but returned no faceId: the resource is not"
                " approved for identification (Limited Access)",
                status=200,
                code=NO_FACE_ID,
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
            urgent=True,
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
                urgent=True,
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

    def group_model(self) -> str | None:
        """The group's recognition model; None when the group does not exist yet."""
        try:
            group = self._call(
                "get_group",
                self._group.get,
                self.settings.group_id,
                return_recognition_model=True,
            )
        except CloudFailure as failure:
            if failure.status == 404:
                return None
            raise
        return str(getattr(group, "recognition_model", "") or "")

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
        """Every person of the group, a page (one call) at a time."""
        start: str | None = None
        while True:
            page, start = self.persons_page(start)
            yield from page
            if start is None:
                return

    def persons_page(
        self, start: str | None, top: int = PAGE
    ) -> tuple[list[CloudPersonInfo], str | None]:
        """One page of persons after `start`, and where the next page starts (None: last)."""
        page = self._call(
            "list_persons", self._persons.list, self.settings.group_id, start=start, top=top
        )
        persons = [
            CloudPersonInfo(
                str(p.person_id),
                str(p.user_data or ""),
                tuple(map(str, p.persisted_face_ids or ())),
            )
            for p in page or []
        ]
        following = persons[-1].person_id if persons and len(persons) >= top else None
        return persons, following

    def member_of(self, person: CloudPersonInfo) -> str | None:
        """The member a person stands for when this store made it, else None."""
        return member_of_data(person.user_data, self.settings.tag)

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
            user_data=self.settings.tag + member_id,
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
