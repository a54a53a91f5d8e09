"""The emulator through the real Azure Face SDK (0.6.1, msrest), as FaceGate's Azure engine
will call it: enrol with real photographs, train, detect, identify, verify; keys, training
and expiry errors; every fault mode as the SDK surfaces it."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from azure.cognitiveservices.vision.face import FaceClient
from azure.cognitiveservices.vision.face.models import APIErrorException, TrainingStatusType
from facegate_azure_emulator import EmulatorSettings, ManualClock, RunningEmulator, start_emulator
from msrest.authentication import CognitiveServicesCredentials
from msrest.exceptions import ClientRequestError

from tests.conftest import Faces

KEY = "sdk-test-key"
TRAINING_SECONDS = 30.0
MODEL = "recognition_04"
ENROLLED = ("barack_obama", "joe_biden", "kit_harington", "rose_leslie", "alex_lacamoire")
UNENROLLED = "people/lin_manuel_miranda/1.png"


def sdk(endpoint: str, key: str = KEY, timeout: float = 10.0) -> FaceClient:
    """A client that fails fast: no retries, a short timeout (msrest's: 3 retries, 100 s)."""
    client = FaceClient(endpoint, CognitiveServicesCredentials(key))
    client.config.retry_policy.retries = 0
    client.config.connection.timeout = timeout
    return client


@pytest.fixture(scope="module")
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def emulator(clock: ManualClock) -> Iterator[RunningEmulator]:
    # One recognition process: the path the CLI runs.
    settings = EmulatorSettings(
        key=KEY, training_seconds=TRAINING_SECONDS, clock=clock, workers=1, rate_per_second=0
    )
    with start_emulator(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: RunningEmulator) -> FaceClient:
    return sdk(emulator.endpoint)


@pytest.fixture
def admin(emulator: RunningEmulator) -> Iterator[object]:
    yield emulator.admin
    emulator.admin.set_fault("healthy", slow_seconds=2.0)


@dataclass(frozen=True)
class Gym:
    group: str
    names: dict[str, str]
    """personId -> person."""
    probes: dict[str, str]
    """person -> a photo of theirs not enrolled (their last; up to two before it are)."""


def detect(client: FaceClient, faces: Faces, path: str, **kwargs: object) -> list[object]:
    return client.face.detect_with_stream(  # type: ignore[no-any-return]
        io.BytesIO(faces.read(path)),
        recognition_model=MODEL,
        detection_model="detection_03",
        **kwargs,
    )


def train_and_wait(client: FaceClient, clock: ManualClock, group: str) -> None:
    client.large_person_group.train(group)
    assert client.large_person_group.get_training_status(group).status == TrainingStatusType.running
    clock.advance(TRAINING_SECONDS)
    status = client.large_person_group.get_training_status(group)
    assert status.status == TrainingStatusType.succeeded
    assert status.last_successful_training is not None


@pytest.fixture(scope="module")
def gym(client: FaceClient, clock: ManualClock, faces: Faces) -> Gym:
    client.large_person_group.create("gym", name="FaceGate test gym", recognition_model=MODEL)
    names, probes = {}, {}
    for who in ENROLLED:
        photos = faces.of(who)
        person = client.large_person_group_person.create("gym", name=who, user_data="member")
        names[person.person_id] = who
        for photo in photos[:-1][:2]:
            added = client.large_person_group_person.add_face_from_stream(
                "gym",
                person.person_id,
                io.BytesIO(faces.read(photo)),
                detection_model="detection_03",
            )
            assert added.persisted_face_id
        probes[who] = photos[-1]
    # Until trained, identify is refused.
    (face,) = detect(client, faces, probes["barack_obama"])
    with pytest.raises(APIErrorException) as untrained:
        client.face.identify([face.face_id], large_person_group_id="gym")
    assert untrained.value.response.status_code == 400
    assert untrained.value.error.error.code == "LargePersonGroupNotTrained"
    # While training, too (409).
    client.large_person_group.train("gym")
    with pytest.raises(APIErrorException) as training:
        client.face.identify([face.face_id], large_person_group_id="gym")
    assert training.value.response.status_code == 409
    assert training.value.error.error.code == "LargePersonGroupTrainingNotFinished"
    clock.advance(TRAINING_SECONDS)
    assert (
        client.large_person_group.get_training_status("gym").status == TrainingStatusType.succeeded
    )
    return Gym("gym", names, probes)


def test_identifies_each_enrolled_person_from_another_photo(
    client: FaceClient, gym: Gym, faces: Faces
) -> None:
    for who, probe in gym.probes.items():
        (face,) = detect(client, faces, probe)
        (result,) = client.face.identify([face.face_id], large_person_group_id=gym.group)
        assert result.face_id == face.face_id
        assert [gym.names[c.person_id] for c in result.candidates] == [who]
        assert 0.5 <= result.candidates[0].confidence <= 1.0


def test_an_unenrolled_person_is_not_identified(client: FaceClient, gym: Gym, faces: Faces) -> None:
    (face,) = detect(client, faces, UNENROLLED)
    (result,) = client.face.identify([face.face_id], large_person_group_id=gym.group)
    assert result.candidates == []
    (loose,) = client.face.identify(
        [face.face_id],
        large_person_group_id=gym.group,
        max_num_of_candidates_returned=5,
        confidence_threshold=0.0,
    )
    assert len(loose.candidates) == 5
    assert all(c.confidence < 0.5 for c in loose.candidates)


def test_detect_finds_every_face_largest_first(client: FaceClient, faces: Faces) -> None:
    found = detect(client, faces, "group/obama_and_biden.jpg", return_recognition_model=True)
    assert len(found) == 3
    areas = [f.face_rectangle.width * f.face_rectangle.height for f in found]
    assert areas == sorted(areas, reverse=True)
    assert all(f.face_id and f.recognition_model == MODEL for f in found)
    anonymous = detect(client, faces, "group/two_people.jpg", return_face_id=False)
    assert len(anonymous) == 2 and all(f.face_id is None for f in anonymous)


def test_identify_takes_up_to_ten_faces(client: FaceClient, gym: Gym, faces: Faces) -> None:
    found = detect(client, faces, "group/obama_and_biden.jpg")
    results = client.face.identify([f.face_id for f in found], large_person_group_id=gym.group)
    named = {gym.names[r.candidates[0].person_id] for r in results if r.candidates}
    assert {"barack_obama", "joe_biden"} <= named


def test_verify_face_to_face_and_face_to_person(client: FaceClient, gym: Gym, faces: Faces) -> None:
    (obama,) = detect(client, faces, gym.probes["barack_obama"])
    (obama_too,) = detect(client, faces, "people/barack_obama/1.jpg")
    (biden,) = detect(client, faces, gym.probes["joe_biden"])
    same = client.face.verify_face_to_face(obama.face_id, obama_too.face_id)
    assert same.is_identical and same.confidence >= 0.5
    other = client.face.verify_face_to_face(obama.face_id, biden.face_id)
    assert not other.is_identical and other.confidence < 0.5
    obama_id = next(pid for pid, who in gym.names.items() if who == "barack_obama")
    to_person = client.face.verify_face_to_person(
        obama.face_id, obama_id, large_person_group_id=gym.group
    )
    assert to_person.is_identical
    assert not client.face.verify_face_to_person(
        biden.face_id, obama_id, large_person_group_id=gym.group
    ).is_identical


def test_a_face_added_after_training_counts_once_retrained(
    client: FaceClient, clock: ManualClock, faces: Faces
) -> None:
    client.large_person_group.create("late", name="late joiners", recognition_model=MODEL)
    kit = client.large_person_group_person.create("late", name="kit")
    client.large_person_group_person.add_face_from_stream(
        "late", kit.person_id, io.BytesIO(faces.read("people/kit_harington/1.jpg"))
    )
    train_and_wait(client, clock, "late")
    lin = client.large_person_group_person.create("late", name="lin")
    client.large_person_group_person.add_face_from_stream(
        "late", lin.person_id, io.BytesIO(faces.read(UNENROLLED))
    )
    (face,) = detect(client, faces, UNENROLLED)
    assert client.face.identify([face.face_id], large_person_group_id="late")[0].candidates == []
    train_and_wait(client, clock, "late")
    (result,) = client.face.identify([face.face_id], large_person_group_id="late")
    assert [c.person_id for c in result.candidates] == [lin.person_id]
    persons = client.large_person_group_person.list("late")
    assert {p.name for p in persons} == {"kit", "lin"}
    assert all(len(p.persisted_face_ids) == 1 for p in persons)


def test_face_ids_expire(client: FaceClient, clock: ManualClock, gym: Gym, faces: Faces) -> None:
    (short,) = detect(client, faces, gym.probes["joe_biden"], face_id_time_to_live=60)
    (default,) = detect(client, faces, gym.probes["joe_biden"])
    clock.advance(61)
    with pytest.raises(APIErrorException) as expired:
        client.face.identify([short.face_id], large_person_group_id=gym.group)
    assert (expired.value.response.status_code, expired.value.error.error.code) == (
        400,
        "FaceNotFound",
    )
    assert client.face.identify([default.face_id], large_person_group_id=gym.group)[0].candidates
    clock.advance(86400)
    with pytest.raises(APIErrorException):
        client.face.verify_face_to_face(default.face_id, default.face_id)


def test_a_photo_with_two_faces_cannot_be_added_without_a_target(
    client: FaceClient, gym: Gym, faces: Faces
) -> None:
    person = client.large_person_group_person.create(gym.group, name="pair")
    image = faces.read("group/kit_with_rose.jpg")
    with pytest.raises(APIErrorException) as two:
        client.large_person_group_person.add_face_from_stream(
            gym.group, person.person_id, io.BytesIO(image)
        )
    assert two.value.error.error.code == "InvalidImage"
    kit = detect(client, faces, "group/kit_with_rose.jpg")[0].face_rectangle
    target = [kit.left, kit.top, kit.width, kit.height]
    added = client.large_person_group_person.add_face_from_stream(
        gym.group, person.person_id, io.BytesIO(image), target_face=target
    )
    got = client.large_person_group_person.get(gym.group, person.person_id)
    assert got.persisted_face_ids == [added.persisted_face_id]
    client.large_person_group_person.delete_face(
        gym.group, person.person_id, added.persisted_face_id
    )
    client.large_person_group_person.delete(gym.group, person.person_id)
    with pytest.raises(APIErrorException) as gone:
        client.large_person_group_person.get(gym.group, person.person_id)
    assert (gone.value.response.status_code, gone.value.error.error.code) == (404, "PersonNotFound")


def test_person_groups_work_alike(client: FaceClient, clock: ManualClock, faces: Faces) -> None:
    client.person_group.create("small", name="small gym", recognition_model=MODEL)
    rose = client.person_group_person.create("small", name="rose")
    client.person_group_person.add_face_from_stream(
        "small", rose.person_id, io.BytesIO(faces.read("people/rose_leslie/1.jpg"))
    )
    client.person_group.train("small")
    clock.advance(TRAINING_SECONDS)
    assert client.person_group.get_training_status("small").status == TrainingStatusType.succeeded
    (face,) = detect(client, faces, "people/rose_leslie/2.jpg")
    (result,) = client.face.identify([face.face_id], person_group_id="small")
    assert result.candidates[0].person_id == rose.person_id
    assert (
        client.person_group.get("small", return_recognition_model=True).recognition_model == MODEL
    )
    assert [g.person_group_id for g in client.person_group.list()] == ["small"]
    client.person_group.delete("small")
    with pytest.raises(APIErrorException) as gone:
        client.person_group.get("small")
    assert (gone.value.response.status_code, gone.value.error.error.code) == (
        404,
        "PersonGroupNotFound",
    )


def test_a_wrong_key_is_an_api_error_401(emulator: RunningEmulator) -> None:
    with pytest.raises(APIErrorException) as denied:
        sdk(emulator.endpoint, key="wrong").large_person_group.list()
    assert denied.value.response.status_code == 401
    assert denied.value.error.error.code == "401"


def test_requests_are_counted_per_operation(
    emulator: RunningEmulator, client: FaceClient, gym: Gym, faces: Faces
) -> None:
    emulator.admin.reset_counts()
    (face,) = detect(client, faces, gym.probes["kit_harington"])
    client.face.identify([face.face_id], large_person_group_id=gym.group)
    assert emulator.admin.counts() == {"Face_DetectWithStream": 1, "Face_Identify": 1}


# ---- fault modes as the SDK sees them ---------------------------------------------------


def test_refuse_is_a_connection_error(emulator: RunningEmulator, admin: object) -> None:
    emulator.admin.set_fault("refuse")
    with pytest.raises(ClientRequestError, match="ConnectionError"):
        sdk(emulator.endpoint).large_person_group.list()
    assert emulator.admin.status()["faceListening"] is False


def test_hang_trips_the_clients_read_timeout(emulator: RunningEmulator, admin: object) -> None:
    emulator.admin.set_fault("hang")
    started = time.monotonic()
    with pytest.raises(ClientRequestError, match="timed out"):
        sdk(emulator.endpoint, timeout=0.3).large_person_group.list()
    assert time.monotonic() - started < 2


def test_throttle_is_429_with_retry_after(emulator: RunningEmulator, admin: object) -> None:
    emulator.admin.set_fault("throttle", retry_after_seconds=2)
    with pytest.raises(APIErrorException) as throttled:
        sdk(emulator.endpoint).large_person_group.list()
    assert throttled.value.response.status_code == 429
    assert throttled.value.response.headers["Retry-After"] == "2"
    assert throttled.value.error.error.code == "429"


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(emulator: RunningEmulator, admin: object, status: int) -> None:
    emulator.admin.set_fault(f"error{status}")
    # msrest's retry policy raises RetryError for 5xx once it has no retries left...
    with pytest.raises(ClientRequestError, match="RetryError"):
        sdk(emulator.endpoint).large_person_group.list()
    # ...unless told to hand the response back, which the SDK turns into APIErrorException.
    client = sdk(emulator.endpoint)
    client.config.retry_policy.policy.raise_on_status = False
    with pytest.raises(APIErrorException) as failed:
        client.large_person_group.list()
    assert failed.value.response.status_code == status


def test_slow_still_answers(emulator: RunningEmulator, admin: object) -> None:
    emulator.admin.set_fault("slow", slow_seconds=0.3)
    started = time.monotonic()
    assert isinstance(sdk(emulator.endpoint).large_person_group.list(), list)
    assert time.monotonic() - started >= 0.3
    with pytest.raises(ClientRequestError, match="timed out"):
        sdk(emulator.endpoint, timeout=0.1).large_person_group.list()


def test_admin_answers_while_a_face_is_being_recognised(
    emulator: RunningEmulator, client: FaceClient, faces: Faces
) -> None:
    import threading

    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (detect(client, faces, "edge/obama_1080p.jpg"), done.set())
    )
    recognising = time.monotonic()
    worker.start()
    worst = 0.0
    while not done.is_set():
        started = time.monotonic()
        emulator.admin.status()
        worst = max(worst, time.monotonic() - started)
    worker.join()
    took = time.monotonic() - recognising
    # On the loop's thread, recognition would hold one admin call for about all of `took`;
    # in a worker process the slowest admin call is ~2% of it (5 ms of 250 ms measured),
    # in a thread (workers=0, the GIL) 13-33%. A ratio, so a busy machine slows both sides.
    assert worst < took / 4, f"admin took {worst:.3f} s of {took:.3f}: is the loop blocked?"
