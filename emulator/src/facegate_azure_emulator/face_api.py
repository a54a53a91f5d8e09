"""The Face API v1.0 over HTTP (aiohttp): routes, request validation, JSON answers.

Paths, query parameters and bodies follow the Face v1.0 swagger (Face.json); error
codes and messages follow Microsoft's error-code tables. Each route is named by the
swagger's operationId (`LargePersonGroup_Train`, ...; the two Verify overloads share
one path and are counted as `Face_Verify`), which is what the request counters use.

The `strict` middleware, after the key check, keeps what the documented service enforces
before serving a call (strict.py): the tier's rate (429), its monthly quota (403) and
Limited Access (403 on the gated operations; Detect checks returnFaceId itself).

Request bodies are read from aiohttp's stream, so chunked uploads (the SDK's
`detect_with_stream` and `add_face_from_stream` send `Transfer-Encoding: chunked` and no
Content-Length) are read like any other; an image over 6 MB is refused while reading.
"""

from __future__ import annotations

import concurrent.futures as cf
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from facegate_server.engines.images import ImageRejected

from facegate_azure_emulator import strict
from facegate_azure_emulator.errors import UNAUTHORIZED_MESSAGE, FaceApiError, bad_argument
from facegate_azure_emulator.recognizer import Analysis, Box, Recognizer
from facegate_azure_emulator.state import DetectedFace, FaceState, GroupKind

log = logging.getLogger("facegate.emulator")

PREFIX = "/face/v1.0"
MIN_IMAGE_BYTES = 1024
MAX_IMAGE_BYTES = 6 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MAX_JSON_BYTES = 1024 * 1024
RECOGNITION_MODELS = ("recognition_01", "recognition_02", "recognition_03", "recognition_04")
DETECTION_MODELS = ("detection_01", "detection_02", "detection_03")
FACE_ATTRIBUTES = frozenset(
    (
        *("age", "gender", "headPose", "smile", "facialHair", "glasses", "emotion", "hair"),
        *("makeup", "occlusion", "accessories", "blur", "exposure", "noise", "mask"),
        "qualityForRecognition",
    )
)
NOT_EMULATED = ("findsimilars", "group", "facelists", "largefacelists", "snapshots", "operations")
"""Face v1.0 paths answered 501: FaceGate does not use them."""
GATED = frozenset(
    (
        *("Face_Identify", "Face_Verify", "NotEmulated.findsimilars", "NotEmulated.group"),
        *(f"{p}_{op}" for p in ("PersonGroup", "LargePersonGroup") for op in ("Create", "Train")),
        *(f"{p}Person_Create" for p in ("PersonGroup", "LargePersonGroup")),
        *(f"{p}Person_AddFaceFromStream" for p in ("PersonGroup", "LargePersonGroup")),
    )
)
"""Operations a resource without Limited Access approval is refused (and Detect with
returnFaceId=true): identification and verification, and building the groups for them."""
DEFAULT_CONFIDENCE_THRESHOLD = 0.5
MAX_CANDIDATES = 5
MAX_FACE_IDS = 10

_GROUP_ID = re.compile(r"^[a-z0-9_-]{1,64}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def error_response(error: FaceApiError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error.body(), error.status, headers)


def _empty(status: int = 200) -> web.Response:
    return web.Response(status=status)


# ---- request parsing ------------------------------------------------------------------


def _bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise bad_argument(f"Invalid argument {name}.")


def _int(request: web.Request, name: str, default: int, low: int, high: int, message: str) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_argument(message) from None
    if not low <= value <= high:
        raise bad_argument(message)
    return value


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str:
    raw = request.query.get(name) or allowed[0]
    if raw not in allowed:
        raise bad_argument(f"'{name}' is invalid.")
    return raw


def _is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.match(value) is not None


def _group_id(request: web.Request, kind: GroupKind) -> str:
    group_id = request.match_info["groupId"]
    if not _GROUP_ID.match(group_id):
        raise kind.not_found(f"{kind.label} ID is invalid.")
    return group_id


def _person_id(request: web.Request) -> str:
    person_id = request.match_info["personId"]
    if not _is_uuid(person_id):
        raise FaceApiError(404, "PersonNotFound", "Person ID is invalid.")
    return person_id.lower()


def _face_id(request: web.Request) -> str:
    face_id = request.match_info["faceId"]
    if not _is_uuid(face_id):
        raise FaceApiError(404, "PersistedFaceNotFound", "Persisted face ID is invalid.")
    return face_id.lower()


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body (chunked or not), or None when it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: web.Request) -> dict[str, Any]:
    raw = await _read_body(request, MAX_JSON_BYTES)
    if raw is None:
        raise bad_argument("Request body is invalid.")
    if not raw.strip():
        raise bad_argument("Request body is invalid.")
    try:
        data = json.loads(raw)
    except ValueError:
        raise bad_argument("JSON parsing error.") from None
    if not isinstance(data, dict):
        raise bad_argument("Request body is invalid.")
    return data


def _optional_str(body: dict[str, Any], name: str, max_length: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_argument("Request body is invalid.")
    if len(value) > max_length:
        raise bad_argument(f"'{name}' is too long.")
    return value


def _name(body: dict[str, Any], *, required: bool) -> str | None:
    name = _optional_str(body, "name", 128)
    if required and not name:
        raise bad_argument("'name' is empty.")
    return name


def _start_top(request: web.Request, *, default_top: int = 1000) -> tuple[str | None, int]:
    start = request.query.get("start") or None
    if start is not None and len(start) > 64:
        raise bad_argument("'start' is too long.")
    top = _int(request, "top", default_top, 1, 1000, "'top' is invalid.")
    return start, top


def _target_face(request: web.Request) -> Box | None:
    raw = request.query.get("targetFace")
    if raw is None or raw == "":
        return None
    try:
        values = [int(v) for v in raw.split(",")]
    except ValueError:
        raise bad_argument("Invalid argument targetFace.") from None
    if len(values) != 4 or min(values) < 0 or values[2] == 0 or values[3] == 0:
        raise bad_argument("Invalid argument targetFace.")
    return Box(*values)


def _group_ref(body: dict[str, Any]) -> tuple[GroupKind, str]:
    """The one group named by personGroupId or largePersonGroupId in a request body."""
    person_group = body.get("personGroupId")
    large_group = body.get("largePersonGroupId")
    if person_group is not None and large_group is not None:
        raise FaceApiError(
            400,
            "PersonGroupIdAndLargePersonGroupIdBothNotNull",
            "Large person group ID and person group ID are both not null.",
        )
    if person_group is None and large_group is None:
        raise FaceApiError(
            400,
            "PersonGroupIdAndLargePersonGroupIdBothNull",
            "Large person group ID and person group ID are both null.",
        )
    kind = GroupKind.PERSON_GROUP if person_group is not None else GroupKind.LARGE_PERSON_GROUP
    group_id = person_group if person_group is not None else large_group
    if not isinstance(group_id, str) or not _GROUP_ID.match(group_id):
        raise bad_argument(f"{kind.label} ID is invalid.")
    return kind, group_id


class FaceApi:
    """The /face/v1.0 routes over one FaceState and one Recognizer."""

    def __init__(
        self,
        state: FaceState,
        recognizer: Recognizer,
        key: str,
        *,
        tier: str = "S0",
        rate_per_second: float | None = 0.0,
        quota_remaining: int | None = None,
    ) -> None:
        if not key:
            raise ValueError("the emulator needs a non-empty key")
        self.state = state
        self.recognizer = recognizer
        self._key = key.encode()
        self.tier = strict.tier(tier)
        self.state.limits = self.tier.limits
        self.rate_limiter = strict.RateLimiter(state.clock, 0.0)
        self.set_rate(rate_per_second)
        self.quota_remaining: int | None = None
        self.set_quota(quota_remaining)
        self.throttle_form = "rate-limit-exceeded"
        self.retry_after_header = True
        self.limited_access = "granted"
        self.limited_access_form = "inner-error"
        self.small_faces = True

    def set_rate(self, per_second: float | None) -> None:
        """Calls a second before 429s: None for the tier's, 0 for no limit."""
        self.rate_limiter.set_rate(self.tier.rate_per_second if per_second is None else per_second)

    def set_quota(self, remaining: int | None) -> None:
        """Transactions left this month: None for the tier's (F0: 30,000; S0: no quota)."""
        if remaining is not None and remaining < 0:
            raise ValueError("the quota left must be >= 0")
        self.quota_remaining = self.tier.monthly_transactions if remaining is None else remaining

    def set_throttle(self, form: str, retry_after_header: bool = True) -> None:
        self.throttle_form = strict.check_choice(form, strict.THROTTLE_FORMS, "throttle form")
        self.retry_after_header = retry_after_header

    def set_limited_access(self, mode: str, form: str = "inner-error") -> None:
        modes = strict.LIMITED_ACCESS_MODES
        self.limited_access = strict.check_choice(mode, modes, "limited access")
        forms = strict.LIMITED_ACCESS_FORMS
        self.limited_access_form = strict.check_choice(form, forms, "limited access form")

    def strict_status(self) -> dict[str, Any]:
        return {
            "tier": self.tier.name,
            "ratePerSecond": self.rate_limiter.rate,
            "throttleForm": self.throttle_form,
            "retryAfterHeader": self.retry_after_header,
            "quotaRemaining": self.quota_remaining,
            "limitedAccess": self.limited_access,
            "limitedAccessForm": self.limited_access_form,
            "snapshotKeepsDeleted": self.state.snapshot_keeps_deleted,
            "smallFaces": self.small_faces,
        }

    def _refuse_unapproved(self) -> None:
        if self.limited_access == "denied":
            raise strict.unsupported_feature(self.limited_access_form)

    # ---- middlewares ------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure as the service's JSON error body."""
        try:
            return await handler(request)
        except FaceApiError as error:
            return error_response(error)
        except web.HTTPException as http:
            if http.status < 400:
                raise
            message = "Resource not found" if http.status == 404 else http.reason
            return json_response(
                {"error": {"code": str(http.status), "message": message}}, http.status
            )

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Ocp-Apim-Subscription-Key") or request.query.get(
            "subscription-key", ""
        )
        if not hmac.compare_digest(given.encode(), self._key):
            raise FaceApiError(401, "401", UNAUTHORIZED_MESSAGE)
        return await handler(request)

    @web.middleware
    async def strict(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The tier's rate (429), its monthly quota (403), Limited Access (403): in that
        order, before the call is served. Every call let through is one transaction."""
        wait = self.rate_limiter.take()
        if wait is not None:
            body, headers = strict.throttled(self.throttle_form, wait, self.retry_after_header)
            return json_response(body, 429, headers)
        if self.quota_remaining is not None:
            if self.quota_remaining <= 0:
                status, body = strict.out_of_quota(self.state.clock())
                return json_response(body, status)
            self.quota_remaining -= 1
        if (request.match_info.route.name or "") in GATED:
            self._refuse_unapproved()
        return await handler(request)

    # ---- routes -------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        routes = [
            web.post(f"{PREFIX}/detect", self.detect, name="Face_DetectWithStream"),
            web.post(f"{PREFIX}/identify", self.identify, name="Face_Identify"),
            web.post(f"{PREFIX}/verify", self.verify, name="Face_Verify"),
        ]
        for kind in GroupKind:
            base = f"{PREFIX}/{kind.value}"
            group = f"{base}/{{groupId}}"
            person = f"{group}/persons/{{personId}}"
            face = f"{person}/persistedfaces/{{faceId}}"
            p = kind.prefix
            routes += [
                web.get(base, self._bind(self.list_groups, kind), name=f"{p}_List"),
                web.put(group, self._bind(self.create_group, kind), name=f"{p}_Create"),
                web.get(group, self._bind(self.get_group, kind), name=f"{p}_Get"),
                web.patch(group, self._bind(self.update_group, kind), name=f"{p}_Update"),
                web.delete(group, self._bind(self.delete_group, kind), name=f"{p}_Delete"),
                web.post(f"{group}/train", self._bind(self.train, kind), name=f"{p}_Train"),
                web.get(
                    f"{group}/training",
                    self._bind(self.training_status, kind),
                    name=f"{p}_GetTrainingStatus",
                ),
                web.post(
                    f"{group}/persons",
                    self._bind(self.create_person, kind),
                    name=f"{p}Person_Create",
                ),
                web.get(
                    f"{group}/persons", self._bind(self.list_persons, kind), name=f"{p}Person_List"
                ),
                web.get(person, self._bind(self.get_person, kind), name=f"{p}Person_Get"),
                web.patch(person, self._bind(self.update_person, kind), name=f"{p}Person_Update"),
                web.delete(person, self._bind(self.delete_person, kind), name=f"{p}Person_Delete"),
                web.post(
                    f"{person}/persistedfaces",
                    self._bind(self.add_face, kind),
                    name=f"{p}Person_AddFaceFromStream",
                ),
                web.get(face, self._bind(self.get_face, kind), name=f"{p}Person_GetFace"),
                web.patch(face, self._bind(self.update_face, kind), name=f"{p}Person_UpdateFace"),
                web.delete(face, self._bind(self.delete_face, kind), name=f"{p}Person_DeleteFace"),
            ]
        for other in NOT_EMULATED:
            routes += [
                web.route("*", f"{PREFIX}/{other}", self.not_emulated, name=f"NotEmulated.{other}"),
                web.route("*", f"{PREFIX}/{other}/{{tail:.*}}", self.not_emulated),
            ]
        return routes

    @staticmethod
    def _bind(
        method: Callable[[GroupKind, web.Request], Awaitable[web.StreamResponse]], kind: GroupKind
    ) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await method(kind, request)

        return handler

    async def not_emulated(self, request: web.Request) -> web.StreamResponse:
        raise FaceApiError(
            501, "NotImplemented", "The FaceGate emulator does not emulate this operation."
        )

    # ---- images -------------------------------------------------------------------------

    async def _image(self, request: web.Request) -> bytes:
        if request.content_type == "application/json":
            raise FaceApiError(
                400,
                "InvalidURL",
                "Invalid image URL: the FaceGate emulator downloads nothing; send the image "
                "bytes as application/octet-stream.",
            )
        if request.content_type != "application/octet-stream":
            raise FaceApiError(415, "BadArgument", "Invalid Media Type.")
        data = await _read_body(request, MAX_IMAGE_BYTES)
        if data is None:
            raise FaceApiError(400, "InvalidImageSize", "Image size is too big.")
        if len(data) < MIN_IMAGE_BYTES:
            raise FaceApiError(400, "InvalidImageSize", "Image size is too small.")
        return data

    async def _analyse(self, data: bytes, *, encode: bool) -> Analysis:
        try:
            return await self.recognizer.analyse(
                data,
                max_bytes=MAX_IMAGE_BYTES,
                max_side=MAX_IMAGE_SIDE,
                encode=encode,
                small_faces=self.small_faces,
            )
        except ImageRejected as rejected:
            if rejected.reason in ("IMAGE_TOO_LARGE", "IMAGE_DIMENSIONS_TOO_LARGE"):
                raise FaceApiError(400, "InvalidImageSize", "Image size is too big.") from None
            raise FaceApiError(
                400, "InvalidImage", "Decoding error, image format unsupported."
            ) from None
        except cf.BrokenExecutor:
            log.error("a recognition worker died; it is being replaced")
            raise FaceApiError(
                500, "InternalServerError", "The recognition worker failed; retry."
            ) from None

    # ---- Face ----------------------------------------------------------------------------

    async def detect(self, request: web.Request) -> web.StreamResponse:
        return_face_id = _bool(request, "returnFaceId", True)
        landmarks = _bool(request, "returnFaceLandmarks", False)
        raw_attributes = request.query.get("returnFaceAttributes") or ""
        attributes = [a for a in raw_attributes.split(",") if a]
        if any(a not in FACE_ATTRIBUTES for a in attributes):
            raise bad_argument("Invalid argument returnFaceAttributes.")
        recognition_model = _choice(request, "recognitionModel", RECOGNITION_MODELS)
        return_model = _bool(request, "returnRecognitionModel", False)
        detection_model = _choice(request, "detectionModel", DETECTION_MODELS)
        if detection_model == "detection_02" and attributes:
            raise bad_argument("'returnFaceAttributes' is not supported by detection_02.")
        if detection_model == "detection_02" and landmarks:
            raise bad_argument("'returnLandmarks' is not supported by detection_02.")
        ttl = _int(
            request, "faceIdTimeToLive", 86400, 60, 86400, "Invalid argument faceIdTimeToLive."
        )
        if return_face_id:
            self._refuse_unapproved()
        with_face_id = return_face_id and self.limited_access != "no-face-id"
        analysis = await self._analyse(await self._image(request), encode=with_face_id)
        faces = []
        for face in analysis.faces:
            item: dict[str, Any] = {}
            if with_face_id:
                assert face.embedding is not None
                item["faceId"] = self.state.remember(
                    face.embedding, recognition_model=recognition_model, ttl=ttl
                )
            if return_model:
                item["recognitionModel"] = recognition_model
            item["faceRectangle"] = face.box.to_json()
            faces.append(item)
        return json_response(faces)

    def _detected(self, face_id: object, *, status: int) -> DetectedFace:
        if not _is_uuid(face_id):
            raise bad_argument("Face ID is invalid.")
        assert isinstance(face_id, str)
        face = self.state.detected(face_id.lower())
        if face is None:
            raise FaceApiError(status, "FaceNotFound", "Face is not found.")
        return face

    async def identify(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        face_ids = body.get("faceIds")
        if not isinstance(face_ids, list) or not 1 <= len(face_ids) <= MAX_FACE_IDS:
            raise bad_argument("The length of faceIds is not in a valid range.")
        if not all(_is_uuid(f) for f in face_ids):
            raise bad_argument("Face ID is invalid.")
        kind, group_id = _group_ref(body)
        max_candidates = body.get("maxNumOfCandidatesReturned", 1)
        if max_candidates is None:
            max_candidates = 1
        if (
            not isinstance(max_candidates, int)
            or isinstance(max_candidates, bool)
            or not 1 <= max_candidates <= MAX_CANDIDATES
        ):
            raise bad_argument("The argument maxNumOfCandidatesReturned is not valid.")
        threshold = body.get("confidenceThreshold")
        if threshold is None:
            threshold = DEFAULT_CONFIDENCE_THRESHOLD
        if (
            not isinstance(threshold, int | float)
            or isinstance(threshold, bool)
            or not 0 <= threshold <= 1
        ):
            raise bad_argument("The argument confidenceThreshold is not valid.")
        if group_id not in self.state.groups[kind]:
            raise FaceApiError(400, f"{kind.prefix}NotFound", f"{kind.label} is not found.")
        faces = [self._detected(f, status=400) for f in face_ids]
        results = self.state.identify(
            kind, group_id, faces, max_candidates=max_candidates, threshold=float(threshold)
        )
        return json_response(results)

    async def verify(self, request: web.Request) -> web.StreamResponse:
        body = await _read_json(request)
        if "faceId1" in body or "faceId2" in body:
            first = self._detected(body.get("faceId1"), status=404)
            second = self._detected(body.get("faceId2"), status=404)
            return json_response(self.state.verify(first, second))
        if "faceId" in body or "personId" in body:
            face_id, person_id = body.get("faceId"), body.get("personId")
            if not _is_uuid(face_id):
                raise bad_argument("Face ID is invalid.")
            if not _is_uuid(person_id):
                raise bad_argument("Person ID is invalid.")
            assert isinstance(person_id, str)
            kind, group_id = _group_ref(body)
            face = self._detected(face_id, status=404)
            return json_response(self.state.verify_person(face, kind, group_id, person_id.lower()))
        raise bad_argument("Request body is invalid.")

    # ---- (large) person groups ----------------------------------------------------

    async def create_group(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = request.match_info["groupId"]
        if not _GROUP_ID.match(group_id):
            raise bad_argument(f"{kind.label} ID is invalid.")
        body = await _read_json(request)
        name = _name(body, required=True)
        assert name is not None
        user_data = _optional_str(body, "userData", 16 * 1024)
        model = body.get("recognitionModel")
        if model is None:
            model = RECOGNITION_MODELS[0]
        if model not in RECOGNITION_MODELS:
            raise bad_argument("'recognitionModel' is invalid.")
        self.state.create_group(
            kind, group_id, name=name, user_data=user_data, recognition_model=model
        )
        return _empty()

    async def get_group(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        with_model = _bool(request, "returnRecognitionModel", False)
        group = self.state.group(kind, _group_id(request, kind))
        return json_response(group.to_api(with_model=with_model))

    async def list_groups(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        start, top = _start_top(request)
        with_model = _bool(request, "returnRecognitionModel", False)
        groups = self.state.list_groups(kind, start=start, top=top)
        return json_response([g.to_api(with_model=with_model) for g in groups])

    async def update_group(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        body = await _read_json(request)
        name = _name(body, required=False)
        user_data = _optional_str(body, "userData", 16 * 1024)
        if name is None and user_data is None:
            raise bad_argument("Both 'name' and 'userData' are empty.")
        self.state.update_group(kind, group_id, name=name, user_data=user_data)
        return _empty()

    async def delete_group(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        self.state.delete_group(kind, _group_id(request, kind))
        return _empty()

    async def train(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        self.state.train(kind, _group_id(request, kind))
        return _empty(202)

    async def training_status(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.training_status(kind, _group_id(request, kind)))

    # ---- persons --------------------------------------------------------------------

    async def create_person(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        body = await _read_json(request)
        name = _name(body, required=True)
        assert name is not None
        user_data = _optional_str(body, "userData", 16 * 1024)
        person = self.state.create_person(kind, group_id, name=name, user_data=user_data)
        return json_response({"personId": person.person_id})

    async def get_person(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        person = self.state.person(kind, group_id, _person_id(request))
        return json_response(person.to_api())

    async def list_persons(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        start, top = _start_top(request)
        persons = self.state.list_persons(kind, group_id, start=start, top=top)
        return json_response([p.to_api() for p in persons])

    async def update_person(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        person_id = _person_id(request)
        self.state.person(kind, group_id, person_id)
        body = await _read_json(request)
        name = _name(body, required=False)
        user_data = _optional_str(body, "userData", 16 * 1024)
        if name is None and user_data is None:
            raise bad_argument("Both 'name' and 'userData' are empty.")
        self.state.update_person(kind, group_id, person_id, name=name, user_data=user_data)
        return _empty()

    async def delete_person(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        self.state.delete_person(kind, group_id, _person_id(request))
        return _empty()

    # ---- persisted faces ----------------------------------------------------------------

    async def add_face(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        person_id = _person_id(request)
        self.state.check_face_room(kind, group_id, person_id)
        user_data = request.query.get("userData")
        if user_data is not None and len(user_data) > 1024:
            raise bad_argument("'userData' is too long.")
        target = _target_face(request)
        _choice(request, "detectionModel", DETECTION_MODELS)
        with self.state.adding_face(kind, group_id, person_id):
            analysis = await self._analyse(await self._image(request), encode=True)
        if target is not None:
            if target.left + target.width > analysis.width or (
                target.top + target.height > analysis.height
            ):
                raise bad_argument("Argument targetFace out of range.")
            overlapping = [(f.box.iou(target), i) for i, f in enumerate(analysis.faces)]
            overlapping = [(iou, i) for iou, i in overlapping if iou >= 0.3]
            if not overlapping:
                raise FaceApiError(
                    400, "InvalidImage", "No face detected in the specified targetFace area."
                )
            chosen = analysis.faces[max(overlapping)[1]]
        else:
            if not analysis.faces:
                raise FaceApiError(400, "InvalidImage", "No face detected in the image.")
            if len(analysis.faces) > 1:
                raise FaceApiError(400, "InvalidImage", "There is more than 1 face in the image.")
            chosen = analysis.faces[0]
        assert chosen.embedding is not None
        # Checked again: the group or person may have gone while the image was analysed.
        face = self.state.add_face(kind, group_id, person_id, chosen.embedding, user_data=user_data)
        return json_response({"persistedFaceId": face.face_id})

    async def get_face(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        person_id = _person_id(request)
        self.state.person(kind, group_id, person_id)
        face = self.state.face(kind, group_id, person_id, _face_id(request))
        out: dict[str, Any] = {"persistedFaceId": face.face_id}
        if face.user_data is not None:
            out["userData"] = face.user_data
        return json_response(out)

    async def update_face(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        person_id = _person_id(request)
        self.state.person(kind, group_id, person_id)
        face_id = _face_id(request)
        self.state.face(kind, group_id, person_id, face_id)
        body = await _read_json(request)
        user_data = _optional_str(body, "userData", 1024)
        self.state.update_face(kind, group_id, person_id, face_id, user_data=user_data)
        return _empty()

    async def delete_face(self, kind: GroupKind, request: web.Request) -> web.StreamResponse:
        group_id = _group_id(request, kind)
        self.state.group(kind, group_id)
        person_id = _person_id(request)
        self.state.person(kind, group_id, person_id)
        self.state.delete_face(kind, group_id, person_id, _face_id(request))
        return _empty()
