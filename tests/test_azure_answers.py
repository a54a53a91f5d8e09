"""The Face API's documented answers that the SDK's models lose, read through the real SDK
from a canned HTTP server: every 429 form, both forms of a Limited Access refusal (the
`innererror` the SDK's APIError drops), a detect without faceId, the quota's
`statusCode` 403, the group's recognition model; and what the cloud path makes of them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from facegate_server.cloud.azure import AzureFace, AzureSettings, CloudFailure
from facegate_server.cloud.health import CloudHealth, Readiness
from facegate_server.cloud.ratelimit import CloudRate
from facegate_server.domain import EngineOutcome

from tests.helpers import FakeClock, image_bytes


class Canned:
    """The answer to the next requests: (status, body, headers), by method."""

    answers: dict[str, tuple[int, object, dict[str, str]]] = {}  # noqa: RUF012 - per test


class Handler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                self.rfile.read(size + 2)
            self.rfile.readline()
        else:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body, headers = Canned.answers[self.command]
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def face(endpoint: str, **kw: object) -> AzureFace:
    return AzureFace(AzureSettings(endpoint, "key", **kw))  # type: ignore[arg-type]


FRAME = image_bytes(200, 200, "JPEG", "gray") + b"\0" * 1024
RATE = "Rate limit is exceeded. Try again in 7 seconds."
THROTTLES = [
    ({"error": {"code": "RateLimitExceeded", "message": RATE}}, {"Retry-After": "3"}, 3.0),
    ({"error": {"code": "RateLimitExceeded", "message": RATE}}, {}, 7.0),
    ({"error": {"statusCode": 429, "message": RATE}}, {}, 7.0),
    ({"error": {"statusCode": 429, "message": "Too many requests."}}, {}, None),
]


@pytest.mark.parametrize(("body", "headers", "wait"), THROTTLES)
def test_every_429_form_is_throttled_with_its_wait(
    endpoint: str, body: object, headers: dict[str, str], wait: float | None
) -> None:
    Canned.answers = {"POST": (429, body, headers)}
    with pytest.raises(CloudFailure) as raised:
        face(endpoint).detect(FRAME, 2.0)
    assert raised.value.outcome is EngineOutcome.THROTTLED
    assert raised.value.retry_after == wait


def test_a_429_holds_the_client_side_rate_limit(endpoint: str) -> None:
    clock = FakeClock()
    client = AzureFace(AzureSettings(endpoint, "key"), rate=CloudRate(10, clock=clock))
    Canned.answers = {"POST": (429, THROTTLES[0][0], {"Retry-After": "3"})}
    with pytest.raises(CloudFailure):
        client.detect(FRAME, 2.0)
    with pytest.raises(CloudFailure) as raised:  # no call: our own limit holds it back
        client.detect(FRAME, 2.0)
    assert raised.value.code == "ClientRateLimit" and not raised.value.engine_fault
    assert client.counter.total() == 1


LIMITED = [
    {"error": {"code": "UnsupportedFeature", "message": "Feature is not supported."}},
    {
        "error": {
            "code": "InvalidRequest",
            "message": "Invalid request has been sent.",
            "innererror": {
                "code": "UnsupportedFeature",
                "message": "Feature is not supported, missing approval for one or more of the"
                " following features: Identification,Verification. Please apply for access at"
                " https://aka.ms/facerecognition",
            },
        }
    },
]


@pytest.mark.parametrize("body", LIMITED, ids=["code", "innererror"])
def test_limited_access_is_read_in_either_form_and_turns_the_cloud_off(
    endpoint: str, body: object
) -> None:
    Canned.answers = {"POST": (403, body, {}), "GET": (200, {"largePersonGroupId": "g"}, {})}
    with pytest.raises(CloudFailure) as raised:
        face(endpoint).detect(FRAME, 2.0)
    failure = raised.value
    assert failure.limited_access and failure.resource_fault and not failure.entry_fault
    assert "UnsupportedFeature" in failure.detail
    assert "Invalid request has been sent" not in failure.detail  # the inner message shows
    health = CloudHealth()
    state = health.check(face(endpoint))
    assert state.readiness is Readiness.OFF
    assert "aka.ms/facerecognition" in state.describe()


def test_a_detect_without_face_id_is_limited_access(endpoint: str) -> None:
    faces = [{"faceRectangle": {"left": 1, "top": 2, "width": 80, "height": 80}}]
    Canned.answers = {"POST": (200, faces, {})}
    with pytest.raises(CloudFailure) as raised:
        face(endpoint).detect(FRAME, 2.0)
    assert raised.value.limited_access and not raised.value.engine_fault
    assert "faceId" in raised.value.detail


def test_the_quota_403_with_status_code_pauses(endpoint: str) -> None:
    body = {
        "error": {
            "statusCode": 403,
            "message": "Out of call volume quota for FaceAPI. Quota will be replenished in 3 days.",
        }
    }
    Canned.answers = {"POST": (403, body, {}), "GET": (200, {"largePersonGroupId": "g"}, {})}
    with pytest.raises(CloudFailure) as raised:
        face(endpoint).create_person("m-1")
    assert raised.value.resource_fault and not raised.value.limited_access
    state = CloudHealth().check(face(endpoint))
    assert state.readiness is Readiness.PAUSED and "quota" in state.describe()


@pytest.mark.parametrize(
    ("status", "code", "entry"),
    [
        (400, "InvalidImage", True),
        (400, "InvalidImageSize", True),
        (400, "BadArgument", True),
        (403, "QuotaExceeded", True),  # the group (F0: 1,000 persons) or the person is full
    ],
)
def test_a_refused_photo_is_the_entrys_fault(
    endpoint: str, status: int, code: str, entry: bool
) -> None:
    Canned.answers = {"POST": (status, {"error": {"code": code, "message": "no"}}, {})}
    with pytest.raises(CloudFailure) as raised:
        face(endpoint).add_face("p-1", FRAME, "tag")
    assert raised.value.entry_fault is entry and not raised.value.resource_fault


def test_the_groups_recognition_model_is_checked(endpoint: str) -> None:
    group = {"largePersonGroupId": "g", "name": "n", "recognitionModel": "recognition_03"}
    Canned.answers = {"GET": (200, group, {}), "POST": (200, [], {})}
    assert face(endpoint).group_model() == "recognition_03"
    state = CloudHealth().check(face(endpoint))
    assert state.readiness is Readiness.OFF
    assert "FACEGATE_AZURE_RECOGNITION_MODEL=recognition_03" in state.describe()
    group["recognitionModel"] = "recognition_04"
    assert CloudHealth().check(face(endpoint)).readiness is Readiness.READY


def test_persons_are_tagged_with_their_store(endpoint: str) -> None:
    Canned.answers = {"POST": (200, {"personId": "p-1"}, {})}
    client = face(endpoint, store_id="abc")
    assert client.create_person("m-1") == "p-1"
    from facegate_server.cloud.azure import CloudPersonInfo

    assert client.member_of(CloudPersonInfo("p-1", "facegate:abc:m-1", ())) == "m-1"
    assert client.member_of(CloudPersonInfo("p-2", "facegate:xyz:m-1", ())) is None
    assert client.member_of(CloudPersonInfo("p-3", "m-1", ())) is None
