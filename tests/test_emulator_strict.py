"""The emulator's strict behaviours, as the documented Face API has them (emulator/README.md,
"Strict behaviours"), through the real SDK and the admin API, on a ManualClock:

- training is a snapshot (Identify answers from the last successful training; Train while
  one runs is 409 ...TrainingNotFinished; persons deleted since come back only when set);
- ConcurrentOperationConflict when a person or group is deleted while a face is added;
- the tier's rate (429 in each documented body form, with or without Retry-After), F0's
  persons per group and monthly quota (the documented 403 body);
- Limited Access denied (both 403 forms, on the gated calls only) and detect without faceId;
- faces of 36 pixels in a 1920x1080 frame.

Success answers are validated against the swagger (tests.test_emulator_conformance's
Contract); error bodies against the bodies Microsoft documents, quoted below.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from azure.cognitiveservices.vision.face import FaceClient
from azure.cognitiveservices.vision.face.models import APIErrorException, TrainingStatusType
from facegate_azure_emulator import (
    EmulatorAdmin,
    EmulatorSettings,
    ManualClock,
    Recognizer,
    RunningEmulator,
    start_emulator,
)
from facegate_azure_emulator.cli import settings_from_args
from facegate_client.cli import build_parser
from PIL import Image

from tests.conftest import Faces
from tests.test_emulator_conformance import REFERENCE, Contract
from tests.test_emulator_sdk import sdk

KEY = "strict-key"
MODEL = "recognition_04"
TRAINING_SECONDS = 30.0
AUTH = {"Ocp-Apim-Subscription-Key": KEY}
FACE = "/face/v1.0"

# The bodies Microsoft documents (emulator/README.md gives each source).
RATE_MESSAGE = re.compile(r"^Rate limit is exceeded\. Try again in (\d+) seconds\.$")
QUOTA_MESSAGE = re.compile(
    r"^Out of call volume quota for FaceAPI\. Quota will be replenished in \d+\.\d\d days\.$"
)
UNSUPPORTED = (
    "Feature is not supported, missing approval for one or more of the following features: "
    "Identification,Verification. Please apply for access at https://aka.ms/facerecognition"
)


@pytest.fixture(scope="module")
def recognizer() -> Iterator[Recognizer]:
    """One recognition process for every emulator of this module (dlib loads once)."""
    shared = Recognizer(1)
    shared.warm_up()
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def emulator(recognizer: Recognizer, clock: ManualClock) -> Iterator[RunningEmulator]:
    """S0, every default strict; no rate limit unless a test sets one."""
    settings = EmulatorSettings(
        key=KEY, training_seconds=TRAINING_SECONDS, clock=clock, rate_per_second=0
    )
    with start_emulator(settings, recognizer=recognizer) as running:
        yield running


@pytest.fixture
def admin(emulator: RunningEmulator) -> Iterator[EmulatorAdmin]:
    yield emulator.admin
    emulator.admin.set_rate(0)
    emulator.admin.set_throttle("rate-limit-exceeded", retry_after_header=True)
    emulator.admin.set_quota(None)
    emulator.admin.set_limited_access("granted")
    emulator.admin.set_snapshot_keeps_deleted(False)


@pytest.fixture(scope="module")
def client(emulator: RunningEmulator) -> FaceClient:
    return sdk(emulator.endpoint, KEY)


@pytest.fixture(scope="module")
def contract() -> Contract:
    if not (REFERENCE / "Face.json").exists():
        pytest.skip(f"the Face API reference is not here ({REFERENCE})")
    return Contract(REFERENCE)


def http(emulator: RunningEmulator, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(
        method, emulator.endpoint + FACE + path, headers=AUTH, timeout=30, **kwargs
    )


def detect_http(emulator: RunningEmulator, image: bytes, **params: str) -> requests.Response:
    return requests.post(
        f"{emulator.endpoint}{FACE}/detect",
        params={"recognitionModel": MODEL, "detectionModel": "detection_03", **params},
        data=image,
        headers={**AUTH, "Content-Type": "application/octet-stream"},
        timeout=30,
    )


def enrol(client: FaceClient, faces: Faces, group: str, *people: str) -> dict[str, str]:
    """A LargePersonGroup of `people` (their first photo each): person -> personId."""
    client.large_person_group.create(group, name=group, recognition_model=MODEL)
    ids = {}
    for who in people:
        person = client.large_person_group_person.create(group, name=who)
        client.large_person_group_person.add_face_from_stream(
            group, person.person_id, io.BytesIO(faces.read(faces.of(who)[0]))
        )
        ids[who] = person.person_id
    return ids


def identify(
    emulator: RunningEmulator, contract: Contract, faces: Faces, group: str, photo: str
) -> list[str]:
    """The candidates' personIds for `photo` (validated against the swagger)."""
    found = contract.check("Face_DetectWithStream", detect_http(emulator, faces.read(photo)))
    response = http(
        emulator,
        "POST",
        "/identify",
        json={"faceIds": [found[0]["faceId"]], "largePersonGroupId": group},
    )
    assert response.status_code == 200, response.text
    (result,) = contract.check("Face_Identify", response)
    return [c["personId"] for c in result["candidates"]]


def error_of(raised: pytest.ExceptionInfo[APIErrorException]) -> tuple[int, Any]:
    response = raised.value.response
    return response.status_code, response.json()


# ---- training is a snapshot ----------------------------------------------------------------


def test_identify_answers_from_the_last_successful_training_while_one_runs(
    emulator: RunningEmulator,
    client: FaceClient,
    clock: ManualClock,
    faces: Faces,
    contract: Contract,
) -> None:
    ids = enrol(client, faces, "snapshot", "kit_harington")
    client.large_person_group.train("snapshot")
    clock.advance(TRAINING_SECONDS)
    lin = client.large_person_group_person.create("snapshot", name="lin")
    client.large_person_group_person.add_face_from_stream(
        "snapshot", lin.person_id, io.BytesIO(faces.read("people/lin_manuel_miranda/1.png"))
    )
    client.large_person_group.train("snapshot")
    status = contract.check(
        "LargePersonGroup_GetTrainingStatus",
        http(emulator, "GET", "/largepersongroups/snapshot/training"),
    )
    assert status["status"] == "running" and "lastSuccessfulTrainingDateTime" in status
    # During the training: the snapshot, without the person added since.
    assert identify(emulator, contract, faces, "snapshot", "people/kit_harington/2.jpg") == [
        ids["kit_harington"]
    ]
    assert identify(emulator, contract, faces, "snapshot", "people/lin_manuel_miranda/1.png") == []
    # Train while one runs: 409, and the running training goes on (not restarted).
    with pytest.raises(APIErrorException) as again:
        client.large_person_group.train("snapshot")
    assert error_of(again) == (
        409,
        {
            "error": {
                "code": "LargePersonGroupTrainingNotFinished",
                "message": "Large person group is under training.",
            }
        },
    )
    clock.advance(TRAINING_SECONDS)
    assert client.large_person_group.get_training_status("snapshot").status == (
        TrainingStatusType.succeeded
    )
    assert identify(emulator, contract, faces, "snapshot", "people/lin_manuel_miranda/1.png") == [
        lin.person_id
    ]


def test_train_while_queued_or_running_is_refused_for_person_groups_too(
    client: FaceClient, clock: ManualClock, faces: Faces
) -> None:
    client.person_group.create("small", name="small", recognition_model=MODEL)
    person = client.person_group_person.create("small", name="rose")
    client.person_group_person.add_face_from_stream(
        "small", person.person_id, io.BytesIO(faces.read("people/rose_leslie/1.jpg"))
    )
    client.person_group.train("small")
    with pytest.raises(APIErrorException) as again:
        client.person_group.train("small")
    assert error_of(again)[1]["error"]["code"] == "PersonGroupTrainingNotFinished"
    clock.advance(TRAINING_SECONDS)
    client.person_group.train("small")  # finished: a new one may start
    clock.advance(TRAINING_SECONDS)


def test_persons_deleted_since_training_come_back_only_when_set(
    emulator: RunningEmulator,
    admin: EmulatorAdmin,
    client: FaceClient,
    clock: ManualClock,
    faces: Faces,
    contract: Contract,
) -> None:
    ids = enrol(client, faces, "deleted", "barack_obama", "joe_biden")
    client.large_person_group.train("deleted")
    clock.advance(TRAINING_SECONDS)
    client.large_person_group_person.delete("deleted", ids["barack_obama"])
    probe = "people/barack_obama/2.jpg"
    assert ids["barack_obama"] not in identify(emulator, contract, faces, "deleted", probe)
    admin.set_snapshot_keeps_deleted(True)
    assert identify(emulator, contract, faces, "deleted", probe)[0] == ids["barack_obama"]
    assert admin.status()["snapshotKeepsDeleted"] is True
    # The admin port's route says the same.
    put = requests.put(
        f"{emulator.admin_endpoint}/_emulator/snapshot", json={"keepsDeleted": False}, timeout=5
    )
    assert put.status_code == 200 and put.json()["snapshotKeepsDeleted"] is False
    assert ids["barack_obama"] not in identify(emulator, contract, faces, "deleted", probe)


# ---- ConcurrentOperationConflict -----------------------------------------------------------


class HeldRecognizer(Recognizer):
    """Holds each analysis until released: a face being added stays in flight."""

    def __init__(self, inner: Recognizer) -> None:  # no pool of its own
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    async def analyse(self, data: bytes, **kwargs: Any) -> Any:
        self.entered.set()
        await asyncio.to_thread(self.release.wait, 30)
        return await self.inner.analyse(data, **kwargs)

    def close(self) -> None:
        pass


def test_deleting_a_person_or_group_while_a_face_is_added_conflicts(
    recognizer: Recognizer, faces: Faces
) -> None:
    held = HeldRecognizer(recognizer)
    settings = EmulatorSettings(key=KEY, clock=ManualClock(), rate_per_second=0)
    with start_emulator(settings, recognizer=held) as running:
        client = sdk(running.endpoint, KEY)
        client.large_person_group.create("busy", name="busy", recognition_model=MODEL)
        person = client.large_person_group_person.create("busy", name="kit")
        added: list[Any] = []
        adding = threading.Thread(
            target=lambda: added.append(
                client.large_person_group_person.add_face_from_stream(
                    "busy", person.person_id, io.BytesIO(faces.read("people/kit_harington/1.jpg"))
                )
            )
        )
        adding.start()
        try:
            assert held.entered.wait(30)
            conflict = {
                "error": {
                    "code": "ConcurrentOperationConflict",
                    "message": f"There is a conflict operation on resource {person.person_id}, "
                    "please try later.",
                }
            }
            with pytest.raises(APIErrorException) as person_delete:
                client.large_person_group_person.delete("busy", person.person_id)
            assert error_of(person_delete) == (409, conflict)
            with pytest.raises(APIErrorException) as group_delete:
                client.large_person_group.delete("busy")
            assert error_of(group_delete)[0] == 409
            assert error_of(group_delete)[1]["error"]["code"] == "ConcurrentOperationConflict"
        finally:
            held.release.set()
            adding.join(30)
        assert added and added[0].persisted_face_id
        client.large_person_group_person.delete("busy", person.person_id)  # no longer busy


# ---- the tier's rate and 429s --------------------------------------------------------------


def test_s0_throttles_over_ten_calls_a_second_on_the_emulators_clock(
    admin: EmulatorAdmin, client: FaceClient, clock: ManualClock
) -> None:
    client.large_person_group.create("rated", name="rated", recognition_model=MODEL)
    admin.set_rate(None)  # the tier's: S0, 10 a second, the bucket full
    assert admin.status()["ratePerSecond"] == 10.0
    for _ in range(10):
        client.large_person_group.get("rated")
    with pytest.raises(APIErrorException) as throttled:
        client.large_person_group.get("rated")
    status, body = error_of(throttled)
    assert status == 429 and set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == "RateLimitExceeded"
    assert RATE_MESSAGE.match(body["error"]["message"])
    assert throttled.value.response.headers["Retry-After"] == "1"
    clock.advance(0.1)  # one call's worth of the bucket back
    client.large_person_group.get("rated")
    with pytest.raises(APIErrorException):
        client.large_person_group.get("rated")


@pytest.mark.parametrize(
    ("form", "header", "keys"),
    [
        ("rate-limit-exceeded", True, {"code", "message"}),
        ("status-code", False, {"statusCode", "message"}),
        ("code-429", False, {"code", "message"}),
    ],
)
def test_each_documented_429_form_with_and_without_retry_after(
    emulator: RunningEmulator, admin: EmulatorAdmin, form: str, header: bool, keys: set[str]
) -> None:
    admin.set_throttle(form, retry_after_header=header)
    admin.set_rate(0.5)  # a burst of 30 (a minute's), then one every 2 s
    for _ in range(30):
        assert http(emulator, "GET", "/largepersongroups").status_code == 200
    response = http(emulator, "GET", "/largepersongroups")
    assert response.status_code == 429
    error = response.json()["error"]
    assert set(error) == keys
    assert RATE_MESSAGE.match(error["message"]).group(1) == "2"  # type: ignore[union-attr]
    if form == "status-code":
        assert error["statusCode"] == 429
    elif form == "code-429":
        assert error["code"] == "429"
    assert ("Retry-After" in response.headers) is header
    if header:
        assert response.headers["Retry-After"] == "2"


def test_rate_and_throttle_through_the_admin_port(
    emulator: RunningEmulator, admin: EmulatorAdmin
) -> None:
    base = f"{emulator.admin_endpoint}/_emulator"
    assert (
        requests.put(f"{base}/rate", json={"perSecond": 1}, timeout=5).json()["ratePerSecond"] == 1
    )
    throttle = requests.put(
        f"{base}/throttle", json={"form": "status-code", "retryAfterHeader": False}, timeout=5
    ).json()
    assert (throttle["throttleForm"], throttle["retryAfterHeader"]) == ("status-code", False)
    assert http(emulator, "GET", "/largepersongroups").status_code == 200
    assert http(emulator, "GET", "/largepersongroups").json()["error"]["statusCode"] == 429
    assert (
        requests.put(f"{base}/rate", json={"perSecond": None}, timeout=5).json()["ratePerSecond"]
        == 10
    )
    for bad in ({"perSecond": -1}, {"perSecond": "fast"}, {}, {"perSecond": 1, "x": 2}):
        assert requests.put(f"{base}/rate", json=bad, timeout=5).status_code == 400
    assert requests.put(f"{base}/throttle", json={"form": "teapot"}, timeout=5).status_code == 400


# ---- F0: its rate, persons per group, monthly quota ----------------------------------------


@pytest.fixture(scope="module")
def free(recognizer: Recognizer) -> Iterator[RunningEmulator]:
    clock = ManualClock(start=1_801_000_000.0)  # 2027-01-26T21:46:40Z: 5.09 days to February
    settings = EmulatorSettings(key=KEY, tier="F0", clock=clock, training_seconds=0)
    with start_emulator(settings, recognizer=recognizer) as running:
        yield running


def test_f0_allows_twenty_calls_a_minute(free: RunningEmulator) -> None:
    assert free.admin.status()["tier"] == "F0"
    for _ in range(20):
        assert http(free, "GET", "/largepersongroups").status_code == 200
    response = http(free, "GET", "/largepersongroups")
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    assert response.json()["error"]["message"] == "Rate limit is exceeded. Try again in 3 seconds."
    clock = free.settings.clock
    assert isinstance(clock, ManualClock)
    clock.advance(3)
    assert http(free, "GET", "/largepersongroups").status_code == 200


def test_f0_holds_a_thousand_persons_a_group(free: RunningEmulator) -> None:
    free.admin.set_rate(0)
    assert http(free, "PUT", "/largepersongroups/f0", json={"name": "f0"}).status_code == 200
    with requests.Session() as session:
        session.headers.update(AUTH)
        url = f"{free.endpoint}{FACE}/largepersongroups/f0/persons"
        for i in range(1000):
            assert session.post(url, json={"name": f"p{i}"}, timeout=10).status_code == 200
        over = session.post(url, json={"name": "one too many"}, timeout=10)
    assert over.status_code == 403
    assert over.json() == {
        "error": {
            "code": "QuotaExceeded",
            "message": "Person number reached large person group level limit.",
        }
    }


def test_f0_monthly_quota_ends_in_the_documented_403(free: RunningEmulator) -> None:
    free.admin.set_rate(0)
    assert free.admin.status()["quotaRemaining"] > 0
    free.admin.set_quota(2)
    assert http(free, "GET", "/largepersongroups").status_code == 200
    assert http(free, "GET", "/largepersongroups").status_code == 200
    spent = http(free, "GET", "/largepersongroups")
    assert spent.status_code == 403
    body = spent.json()
    assert set(body) == {"error"} and set(body["error"]) == {"statusCode", "message"}
    assert body["error"]["statusCode"] == 403
    assert QUOTA_MESSAGE.match(body["error"]["message"])
    assert "5.09 days" in body["error"]["message"]
    # The SDK raises it as an APIErrorException with no code.
    with pytest.raises(APIErrorException) as raised:
        sdk(free.endpoint, KEY).large_person_group.list()
    assert raised.value.response.status_code == 403
    put = requests.put(
        f"{free.admin_endpoint}/_emulator/quota", json={"remaining": None}, timeout=5
    )
    assert put.json()["quotaRemaining"] == 30_000
    assert http(free, "GET", "/largepersongroups").status_code == 200


def test_s0_has_no_quota_unless_one_is_set(emulator: RunningEmulator, admin: EmulatorAdmin) -> None:
    assert admin.status()["quotaRemaining"] is None
    admin.set_quota(0)
    assert http(emulator, "GET", "/largepersongroups").status_code == 403


# ---- Limited Access ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        (
            "inner-error",
            {
                "error": {
                    "code": "InvalidRequest",
                    "message": "Invalid request has been sent.",
                    "innererror": {"code": "UnsupportedFeature", "message": UNSUPPORTED},
                }
            },
        ),
        ("unsupported-feature", {"error": {"code": "UnsupportedFeature", "message": UNSUPPORTED}}),
    ],
)
def test_limited_access_denied_refuses_the_gated_calls_only(
    emulator: RunningEmulator,
    admin: EmulatorAdmin,
    client: FaceClient,
    faces: Faces,
    contract: Contract,
    form: str,
    expected: dict[str, Any],
) -> None:
    image = faces.read("people/barack_obama/5.jpg")
    granted = contract.check("Face_DetectWithStream", detect_http(emulator, image))
    admin.set_limited_access("denied", form)
    assert admin.status()["limitedAccess"] == "denied"
    refused = [
        detect_http(emulator, image),
        http(
            emulator,
            "POST",
            "/identify",
            json={"faceIds": [granted[0]["faceId"]], "largePersonGroupId": "snapshot"},
        ),
        http(
            emulator,
            "POST",
            "/verify",
            json={"faceId1": granted[0]["faceId"], "faceId2": granted[0]["faceId"]},
        ),
        http(emulator, "PUT", f"/largepersongroups/denied-{form}", json={"name": "d"}),
        http(emulator, "POST", "/largepersongroups/snapshot/train"),
        http(emulator, "POST", "/largepersongroups/snapshot/persons", json={"name": "x"}),
        http(emulator, "POST", "/findsimilars", json={}),
    ]
    for response in refused:
        assert (response.status_code, response.json()) == (403, expected), response.request.url
    # Detection without faceId and reading the groups are not gated.
    anonymous = detect_http(emulator, image, returnFaceId="false")
    assert anonymous.status_code == 200
    assert "faceId" not in contract.check("Face_DetectWithStream", anonymous)[0]
    assert http(emulator, "GET", "/largepersongroups").status_code == 200
    with pytest.raises(APIErrorException) as sdk_refused:
        client.face.detect_with_stream(io.BytesIO(image), recognition_model=MODEL)
    assert sdk_refused.value.response.status_code == 403
    assert sdk_refused.value.error.error.code == expected["error"]["code"]


def test_limited_access_no_face_id_answers_detect_without_face_ids(
    emulator: RunningEmulator,
    admin: EmulatorAdmin,
    client: FaceClient,
    faces: Faces,
    contract: Contract,
) -> None:
    put = requests.put(
        f"{emulator.admin_endpoint}/_emulator/limited-access",
        json={"mode": "no-face-id"},
        timeout=5,
    )
    assert put.status_code == 200 and put.json()["limitedAccess"] == "no-face-id"
    image = faces.read("people/barack_obama/5.jpg")
    (face,) = contract.check("Face_DetectWithStream", detect_http(emulator, image))
    assert "faceId" not in face and face["faceRectangle"]["width"] > 0
    (sdk_face,) = client.face.detect_with_stream(io.BytesIO(image), recognition_model=MODEL)
    assert sdk_face.face_id is None
    bad = requests.put(
        f"{emulator.admin_endpoint}/_emulator/limited-access", json={"mode": "maybe"}, timeout=5
    )
    assert bad.status_code == 400


# ---- small faces ---------------------------------------------------------------------------


def queue_frame(faces: Faces, small_face: int) -> bytes:
    """A 1920x1080 frame: a member close to the camera, and someone queueing far behind
    whose face is about `small_face` pixels wide."""
    frame = Image.new("RGB", (1920, 1080), (118, 121, 112))
    near = Image.open(io.BytesIO(faces.read("people/joe_biden/2.jpg"))).convert("RGB")
    frame.paste(near.resize((900, 900)), (100, 90))
    far = Image.open(io.BytesIO(faces.read("people/barack_obama/5.jpg"))).convert("RGB")
    # obama/5.jpg's face is about 107 px wide at (390, 68): crop 1.8x around it, then scale.
    crop = far.crop((347, 25, 540, 218))
    side = round(crop.width * small_face / 107)
    frame.paste(crop.resize((side, side), Image.Resampling.LANCZOS), (1500, 300))
    out = io.BytesIO()
    frame.save(out, format="JPEG", quality=92)
    return out.getvalue()


def test_finds_a_36_pixel_face_behind_the_member_in_a_1080p_frame(
    emulator: RunningEmulator, client: FaceClient, faces: Faces, contract: Contract
) -> None:
    found = contract.check("Face_DetectWithStream", detect_http(emulator, queue_frame(faces, 36)))
    widths = [f["faceRectangle"]["width"] for f in found]
    assert len(widths) == 2, widths
    assert widths[0] > 300 and 30 <= widths[1] <= 48, widths
    assert found[1]["faceRectangle"]["left"] > 1400
    # Enrolling from such a photo is refused as Azure refuses it: more than one face.
    client.large_person_group.create("queue", name="queue", recognition_model=MODEL)
    person = client.large_person_group_person.create("queue", name="joe")
    with pytest.raises(APIErrorException) as refused:
        client.large_person_group_person.add_face_from_stream(
            "queue", person.person_id, io.BytesIO(queue_frame(faces, 36))
        )
    assert error_of(refused) == (
        400,
        {"error": {"code": "InvalidImage", "message": "There is more than 1 face in the image."}},
    )


def test_without_the_small_face_pass_the_face_behind_is_missed(
    recognizer: Recognizer, faces: Faces
) -> None:
    settings = EmulatorSettings(key=KEY, clock=ManualClock(), rate_per_second=0, small_faces=False)
    with start_emulator(settings, recognizer=recognizer) as running:
        found = detect_http(running, queue_frame(faces, 36)).json()
        assert len(found) == 1 and found[0]["faceRectangle"]["width"] > 300
        assert running.admin.status()["smallFaces"] is False


# ---- flags ---------------------------------------------------------------------------------


def test_strict_flags_become_settings() -> None:
    def parse(*argv: str) -> Any:
        args = build_parser().parse_args(
            ["azure-emulator", "--listen", "127.0.0.1:0", "--key", "k", *argv]
        )
        return settings_from_args(args)

    default = parse()
    assert (default.tier, default.rate_per_second, default.quota_remaining) == ("S0", None, None)
    assert (default.limited_access, default.limited_access_form) == ("granted", "inner-error")
    assert (default.throttle_form, default.retry_after_header) == ("rate-limit-exceeded", True)
    assert not default.snapshot_keeps_deleted and default.small_faces
    strict = parse(
        *("--tier", "F0", "--rate", "0", "--quota", "5", "--limited-access", "denied"),
        *("--limited-access-form", "unsupported-feature", "--throttle-form", "status-code"),
        *("--no-retry-after", "--snapshot-keeps-deleted", "--small-faces", "off"),
    )
    assert (strict.tier, strict.rate_per_second, strict.quota_remaining) == ("F0", 0, 5)
    assert (strict.limited_access, strict.limited_access_form) == ("denied", "unsupported-feature")
    assert (strict.throttle_form, strict.retry_after_header) == ("status-code", False)
    assert strict.snapshot_keeps_deleted and not strict.small_faces
    with pytest.raises(ValueError, match="must be >= 0"):
        parse("--rate", "-1")
    assert json.dumps(default.tier)  # plain strings, as the status shows them
