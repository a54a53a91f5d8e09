"""The emulator over plain HTTP: keys, errors, chunked bodies, the admin API, every fault
mode and the latency. Needs no photographs (a fault shows on any call)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from facegate_azure_emulator import (
    EmulatorSettings,
    FaultMode,
    FaultSettings,
    LatencyProfile,
    Limits,
    ManualClock,
    RunningEmulator,
    start_emulator,
)
from PIL import Image

KEY = "http-test-key"
AUTH = {"Ocp-Apim-Subscription-Key": KEY}
FACE = "/face/v1.0"


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    settings = EmulatorSettings(
        key=KEY,
        training_seconds=0,
        clock=ManualClock(),
        workers=0,
        rate_per_second=0,
        limits=Limits(persons_per_person_group=3, faces_per_person=0),
    )
    with start_emulator(settings) as running:
        yield running


@pytest.fixture(autouse=True)
def healthy_after(emulator: RunningEmulator) -> Iterator[None]:
    yield
    emulator.admin.set_fault("healthy", slow_seconds=2.0, hang_max_seconds=120.0)
    emulator.admin.set_latency("none")


def call(
    emulator: RunningEmulator,
    method: str,
    path: str,
    *,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    with requests.Session() as session:
        return session.request(
            method,
            emulator.endpoint + FACE + path,
            headers=AUTH | (headers or {}),
            timeout=timeout,
            **kwargs,
        )


def admin(emulator: RunningEmulator, method: str, path: str, body: Any = None) -> Any:
    response = requests.request(
        method, f"{emulator.admin_endpoint}/_emulator/{path}", json=body, timeout=5
    )
    assert response.status_code == 200, response.text
    return response.json()


def error(response: requests.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return response.status_code, body["error"]["code"]


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(out, "PNG")
    return out.getvalue()


# ---- keys and errors ----------------------------------------------------------------


def test_a_wrong_or_missing_key_is_401(emulator: RunningEmulator) -> None:
    assert error(
        call(emulator, "GET", "/persongroups", headers={"Ocp-Apim-Subscription-Key": "no"})
    ) == (401, "401")
    with requests.Session() as session:
        bare = session.get(emulator.endpoint + FACE + "/persongroups", timeout=5)
    assert error(bare) == (401, "401")
    query_key = requests.get(
        emulator.endpoint + FACE + "/persongroups", params={"subscription-key": KEY}, timeout=5
    )
    assert query_key.status_code == 200


def test_unknown_paths_and_operations_not_emulated(emulator: RunningEmulator) -> None:
    assert error(call(emulator, "GET", "/nowhere")) == (404, "404")
    assert error(call(emulator, "POST", "/findsimilars", json={})) == (501, "NotImplemented")
    assert error(call(emulator, "GET", "/facelists/x")) == (501, "NotImplemented")


def test_group_ids_bodies_and_paging_are_validated(emulator: RunningEmulator) -> None:
    assert error(call(emulator, "PUT", "/persongroups/Bad!", json={"name": "x"})) == (
        400,
        "BadArgument",
    )
    assert error(call(emulator, "GET", "/persongroups/Bad!")) == (404, "PersonGroupNotFound")
    assert error(
        call(
            emulator,
            "PUT",
            "/persongroups/v1",
            data=b"{nope",
            headers={"Content-Type": "application/json"},
        )
    ) == (400, "BadArgument")
    assert error(call(emulator, "PUT", "/persongroups/v1", json={"name": ""})) == (
        400,
        "BadArgument",
    )
    assert error(call(emulator, "PUT", "/persongroups/v1", json={"name": "x" * 129})) == (
        400,
        "BadArgument",
    )
    assert error(
        call(
            emulator,
            "PUT",
            "/persongroups/v1",
            json={"name": "x", "recognitionModel": "recognition_09"},
        )
    ) == (400, "BadArgument")
    assert call(emulator, "PUT", "/persongroups/v1", json={"name": "x"}).status_code == 200
    assert error(call(emulator, "PUT", "/persongroups/v1", json={"name": "x"})) == (
        409,
        "PersonGroupExists",
    )
    assert error(call(emulator, "GET", "/persongroups", params={"top": 0})) == (400, "BadArgument")
    assert error(call(emulator, "GET", "/persongroups/v1/persons/not-a-uuid")) == (
        404,
        "PersonNotFound",
    )
    assert error(call(emulator, "GET", "/largepersongroups/missing/training")) == (
        404,
        "LargePersonGroupNotFound",
    )
    assert error(call(emulator, "GET", "/persongroups/v1/training")) == (
        404,
        "PersonGroupNotTrained",
    )


def test_persons_a_group_and_faces_a_person_are_limited(emulator: RunningEmulator) -> None:
    assert call(emulator, "PUT", "/persongroups/full", json={"name": "full"}).status_code == 200
    for i in range(3):
        created = call(emulator, "POST", "/persongroups/full/persons", json={"name": str(i)})
        assert created.status_code == 200
    over = call(emulator, "POST", "/persongroups/full/persons", json={"name": "one too many"})
    assert error(over) == (403, "QuotaExceeded")
    person = created.json()["personId"]
    # This emulator allows 0 faces a person: the quota is checked before the image.
    face = call(
        emulator,
        "POST",
        f"/persongroups/full/persons/{person}/persistedfaces",
        data=png(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert error(face) == (403, "QuotaExceeded")


def test_identify_and_verify_requests_are_validated(emulator: RunningEmulator) -> None:
    face = "00000000-0000-4000-8000-000000000000"
    cases = [
        ({"faceIds": [], "personGroupId": "g"}, "BadArgument"),
        ({"faceIds": [face] * 11, "personGroupId": "g"}, "BadArgument"),
        ({"faceIds": ["nope"], "personGroupId": "g"}, "BadArgument"),
        ({"faceIds": [face]}, "PersonGroupIdAndLargePersonGroupIdBothNull"),
        (
            {"faceIds": [face], "personGroupId": "g", "largePersonGroupId": "g"},
            "PersonGroupIdAndLargePersonGroupIdBothNotNull",
        ),
        ({"faceIds": [face], "personGroupId": "g", "maxNumOfCandidatesReturned": 6}, "BadArgument"),
        ({"faceIds": [face], "personGroupId": "g", "confidenceThreshold": 1.5}, "BadArgument"),
        ({"faceIds": [face], "personGroupId": "missing"}, "PersonGroupNotFound"),
        ({"faceIds": [face], "personGroupId": "v1"}, "FaceNotFound"),
    ]
    call(emulator, "PUT", "/persongroups/v1", json={"name": "x"})
    for body, code in cases:
        assert error(call(emulator, "POST", "/identify", json=body)) == (400, code), body
    assert error(call(emulator, "POST", "/verify", json={"faceId1": face, "faceId2": face})) == (
        404,
        "FaceNotFound",
    )
    assert error(call(emulator, "POST", "/verify", json={"faceId1": "x", "faceId2": face})) == (
        400,
        "BadArgument",
    )
    assert error(call(emulator, "POST", "/verify", json={})) == (400, "BadArgument")


# ---- images and chunked bodies -------------------------------------------------------


def test_images_are_checked_by_the_documented_rules(emulator: RunningEmulator) -> None:
    octets = {"Content-Type": "application/octet-stream"}
    small = call(emulator, "POST", "/detect", data=b"\xff\xd8" + b"\0" * 500, headers=octets)
    assert error(small) == (400, "InvalidImageSize")
    big = call(emulator, "POST", "/detect", data=iter([b"\0" * (1 << 20)] * 7), headers=octets)
    assert error(big) == (400, "InvalidImageSize")
    garbage = call(emulator, "POST", "/detect", data=b"not an image" * 200, headers=octets)
    assert error(garbage) == (400, "InvalidImage")
    truncated = png(400, 400)
    cut = call(emulator, "POST", "/detect", data=truncated[: len(truncated) // 2], headers=octets)
    assert error(cut) == (400, "InvalidImage")
    as_text = call(emulator, "POST", "/detect", data=png(), headers={"Content-Type": "text/plain"})
    assert error(as_text) == (415, "BadArgument")
    url = call(emulator, "POST", "/detect", json={"url": "http://example.invalid/x.jpg"})
    assert error(url) == (400, "InvalidURL")
    bad_ttl = call(
        emulator, "POST", "/detect", params={"faceIdTimeToLive": 59}, data=png(), headers=octets
    )
    assert error(bad_ttl) == (400, "BadArgument")
    bad_model = call(
        emulator,
        "POST",
        "/detect",
        params={"detectionModel": "detection_09"},
        data=png(),
        headers=octets,
    )
    assert error(bad_model) == (400, "BadArgument")


def test_chunked_and_sized_uploads_are_both_read(emulator: RunningEmulator) -> None:
    image = png(320, 240)
    for chunked in (True, False):
        connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=5)
        try:
            headers = AUTH | {"Content-Type": "application/octet-stream"}
            if chunked:
                pieces = (image[i : i + 1000] for i in range(0, len(image), 1000))
                connection.request(
                    "POST", FACE + "/detect", body=pieces, headers=headers, encode_chunked=True
                )
            else:
                connection.request("POST", FACE + "/detect", body=image, headers=headers)
            response = connection.getresponse()
            assert (response.status, json.loads(response.read())) == (200, []), chunked
        finally:
            connection.close()


# ---- the admin API and request counts ------------------------------------------------


def test_counts_are_kept_per_operation_and_can_be_reset(emulator: RunningEmulator) -> None:
    admin(emulator, "DELETE", "counts")
    call(emulator, "GET", "/persongroups")
    call(emulator, "GET", "/persongroups")
    call(emulator, "GET", "/largepersongroups/x")
    counts = admin(emulator, "GET", "counts")
    assert counts["received"] == {"PersonGroup_List": 2, "LargePersonGroup_Get": 1}
    assert counts["answered"] == {
        "PersonGroup_List": {"200": 2},
        "LargePersonGroup_Get": {"404": 1},
    }
    assert counts["total"] == 3
    assert emulator.admin.counts() == {"PersonGroup_List": 2, "LargePersonGroup_Get": 1}
    assert emulator.admin.answered()["LargePersonGroup_Get"] == {404: 1}
    emulator.admin.reset_counts()
    assert admin(emulator, "GET", "counts")["total"] == 0


def test_admin_rejects_bad_requests(emulator: RunningEmulator) -> None:
    for body in (
        {"mode": "sideways"},
        {},
        {"mode": "slow", "slowSeconds": -1},
        {"mode": "flap", "flapWeights": {"flap": 1}},
    ):
        response = requests.put(f"{emulator.admin_endpoint}/_emulator/fault", json=body, timeout=5)
        assert response.status_code == 400, body
        assert "error" in response.json()
    bad = requests.put(
        f"{emulator.admin_endpoint}/_emulator/latency", json={"profile": "moon"}, timeout=5
    )
    assert bad.status_code == 400


def test_status_reports_the_settings(emulator: RunningEmulator) -> None:
    status = admin(emulator, "PUT", "latency", {"profile": "field"})
    assert status["latency"] == {
        "name": "field",
        "minMs": 700,
        "maxMs": 1200,
        "distribution": "skewed",
    }
    status = admin(
        emulator, "PUT", "fault", {"mode": "throttle", "retryAfterSeconds": 4, "seed": 3}
    )
    assert status["fault"]["mode"] == "throttle" and status["fault"]["retryAfterSeconds"] == 4
    assert status["seed"] == 3
    assert status["endpoint"] == emulator.endpoint
    assert status["adminEndpoint"] == emulator.admin_endpoint


# ---- fault modes -------------------------------------------------------------------------


def test_refuse_closes_the_face_port_but_not_the_admin_port(emulator: RunningEmulator) -> None:
    keep_alive = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=2)
    keep_alive.request("GET", FACE + "/persongroups", headers=AUTH)
    assert keep_alive.getresponse().read() is not None
    status = admin(emulator, "PUT", "fault", {"mode": "refuse"})
    assert status["faceListening"] is False
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", emulator.port), timeout=2),
    ):
        pass
    # A connection opened before is dropped too.
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        keep_alive.request("GET", FACE + "/persongroups", headers=AUTH)
        keep_alive.getresponse()
    keep_alive.close()
    assert admin(emulator, "GET", "status")["fault"]["mode"] == "refuse"
    admin(emulator, "PUT", "fault", {"mode": "healthy"})
    assert call(emulator, "GET", "/persongroups").status_code == 200, "same port again"


def test_hang_answers_nothing_until_the_client_gives_up(emulator: RunningEmulator) -> None:
    emulator.admin.set_fault(FaultMode.HANG)
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        call(emulator, "GET", "/persongroups", timeout=0.3)
    assert time.monotonic() - started < 2
    # The client closed its connection: the hung request is gone, nothing leaks.
    emulator.admin.wait_hung(0)


def test_waiting_for_hung_requests_is_bounded(emulator: RunningEmulator) -> None:
    emulator.admin.wait_hung(0)  # none hung: returns at once
    with pytest.raises(TimeoutError):
        emulator.admin.wait_hung(1, timeout=0.05)  # healthy: none ever will be


def test_a_hung_request_is_answered_once_the_mode_changes(emulator: RunningEmulator) -> None:
    emulator.admin.set_fault("hang")
    answers: list[int] = []
    caller = threading.Thread(
        target=lambda: answers.append(call(emulator, "GET", "/persongroups").status_code)
    )
    caller.start()
    emulator.admin.wait_hung(1)
    emulator.admin.set_fault("throttle")
    caller.join(timeout=5)
    assert answers == [429]


def test_hang_is_bounded_and_ends_unanswered(emulator: RunningEmulator) -> None:
    emulator.admin.set_fault("hang", hang_max_seconds=0.2)
    with pytest.raises(requests.exceptions.ConnectionError):
        call(emulator, "GET", "/persongroups", timeout=3)
    assert emulator.admin.status()["hung"] == 0
    assert emulator.admin.status()["counts"]["dropped"]["PersonGroup_List"] >= 1


def test_throttle_is_429_with_retry_after(emulator: RunningEmulator) -> None:
    emulator.admin.set_fault("throttle", retry_after_seconds=3)
    response = call(emulator, "GET", "/persongroups")
    assert error(response) == (429, "429")
    assert response.headers["Retry-After"] == "3"


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [("error500", 500, "InternalServerError"), ("error503", 503, "ServiceUnavailable")],
)
def test_server_errors(emulator: RunningEmulator, mode: str, status: int, code: str) -> None:
    emulator.admin.set_fault(mode)
    assert error(call(emulator, "GET", "/persongroups")) == (status, code)


def test_slow_adds_a_fixed_delay(emulator: RunningEmulator) -> None:
    default = FaultSettings().slow_seconds
    emulator.admin.set_fault("slow", slow_seconds=0.2)
    started = time.monotonic()
    assert call(emulator, "GET", "/persongroups").status_code == 200
    # At least the delay asked for; under the default (2 s), so it is that delay. Only the
    # lower bound is exact: a loaded machine may add to it, never take from it.
    assert 0.2 <= time.monotonic() - started < default


def test_flap_mixes_modes_repeatably_for_a_seed(emulator: RunningEmulator) -> None:
    weights = {"healthy": 2, "throttle": 1, "error500": 1, "error503": 1, "refuse": 1}

    def outcomes() -> list[int | str]:
        seen: list[int | str] = []
        for _ in range(24):
            try:
                seen.append(call(emulator, "GET", "/persongroups", timeout=2).status_code)
            except requests.exceptions.ConnectionError:
                seen.append("dropped")
        return seen

    admin(emulator, "PUT", "fault", {"mode": "flap", "flapWeights": weights, "seed": 11})
    first = outcomes()
    emulator.admin.set_fault("flap", seed=11)
    assert outcomes() == first
    assert {200, 429, 500, 503, "dropped"} <= set(first)


def timed_call(emulator: RunningEmulator) -> float:
    started = time.monotonic()
    assert call(emulator, "GET", "/persongroups").status_code == 200
    return time.monotonic() - started


def test_latency_is_added_to_every_call(emulator: RunningEmulator) -> None:
    emulator.admin.set_latency(LatencyProfile(300, 350))
    # The lower bound is exact (the emulator sleeps at least that long); the upper one
    # only says the call ends, whatever else the machine is doing.
    assert 0.3 <= timed_call(emulator) < 5.0
    admin(emulator, "PUT", "latency", {"minMs": 0, "maxMs": 0})
    # Without the latency, a call is quicker than the least latency had been: the
    # fastest of three, so that one call slowed by a busy machine does not decide.
    assert min(timed_call(emulator) for _ in range(3)) < 0.3
