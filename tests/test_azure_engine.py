"""The Azure engine through the real SDK, against the Face API emulator, on real faces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_azure_emulator import RunningEmulator

from tests.cloud import CloudGate, cloud_gate, emulator, engines
from tests.conftest import Faces

GRANTED, UNKNOWN = pb.DECISION_GRANTED, pb.DECISION_DENIED_UNKNOWN_FACE


@pytest.fixture(scope="module")
def emu(faces: Faces) -> Iterator[RunningEmulator]:
    with emulator() as running:
        yield running


@pytest.fixture(scope="module")
def gate(emu: RunningEmulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudGate]:
    with cloud_gate(emu, tmp_path_factory.mktemp("data")) as running:
        yield running


@pytest.fixture(autouse=True)
def healthy(emu: RunningEmulator, gate: CloudGate) -> Iterator[None]:
    yield
    emu.admin.set_fault("healthy")
    gate.reset_breaker()


def enroll(gate: CloudGate, faces: Faces, member_id: str, *paths: str) -> None:
    gate.stub.Enroll(
        pb.EnrollRequest(member_id=member_id, photos=[faces.read(p) for p in paths]), timeout=60
    )


def test_enrol_train_and_identify_through_azure(gate: CloudGate, faces: Faces) -> None:
    enroll(gate, faces, "m-obama", "people/barack_obama/1.jpg", "people/barack_obama/2.jpg")
    enroll(gate, faces, "m-biden", "people/joe_biden/1.jpg")
    gate.settle()
    persons = gate.persons()
    assert {m: len(f) for m, f in persons.items()} == {"m-obama": 2, "m-biden": 1}

    response = gate.identify(faces.read("people/barack_obama/3.jpg"))
    assert (response.decision, response.member_id) == (GRANTED, "m-obama")
    assert response.engine == pb.ENGINE_AZURE
    assert engines(response) == {"azure": "DECIDED", "local": "AGREED"}
    assert 0.5 <= response.confidence <= 1.0
    assert response.cloud_transactions == 2  # detect, identify

    stranger = gate.identify(faces.read("people/lin_manuel_miranda/1.png"))
    assert (stranger.decision, stranger.engine) == (UNKNOWN, pb.ENGINE_AZURE)
    assert stranger.member_id == ""

    status = gate.stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    counts = {c.name: c.count for c in status.cloud_transactions}
    assert counts["detect"] >= 2 and counts["identify"] >= 2 and counts["add_face"] == 3
    assert status.circuit_state == pb.CIRCUIT_STATE_CLOSED
    assert status.outbox_depth == 0
    assert status.routing_policy == "cloud-first"


def test_a_member_gets_in_through_the_local_engine_until_trained(
    gate: CloudGate, faces: Faces
) -> None:
    enroll(gate, faces, "m-kit", "people/kit_harington/1.jpg")  # not yet sent to the cloud
    response = gate.identify(faces.read("people/kit_harington/2.jpg"))
    assert (response.decision, response.member_id) == (GRANTED, "m-kit")
    assert response.engine == pb.ENGINE_LOCAL
    assert engines(response) == {"azure": "OUTRANKED", "local": "DECIDED"}
    gate.settle()
    trained = gate.identify(faces.read("people/kit_harington/2.jpg"))
    assert (trained.member_id, trained.engine) == ("m-kit", pb.ENGINE_AZURE)


def test_delete_removes_the_azure_person(gate: CloudGate, faces: Faces) -> None:
    enroll(gate, faces, "m-rose", "people/rose_leslie/1.jpg")
    gate.settle()
    assert "m-rose" in gate.persons()
    gate.stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-rose"), timeout=5)
    # Denied at once, before the cloud has heard of the deletion.
    assert gate.identify(faces.read("people/rose_leslie/2.jpg")).decision == UNKNOWN
    gate.settle()
    assert "m-rose" not in gate.persons()


def test_cloud_faults_never_reach_the_turnstile(
    emu: RunningEmulator, gate: CloudGate, faces: Faces
) -> None:
    enroll(gate, faces, "m-alex", "people/alex_lacamoire/1.jpg")
    gate.settle()
    frame = faces.read("people/alex_lacamoire/2.jpg")
    expected = {
        "refuse": "ERROR",
        "throttle": "THROTTLED",
        "error500": "ERROR",
        "error503": "ERROR",
        "hang": "TIMED_OUT",
    }
    for mode, outcome in expected.items():
        emu.admin.set_fault(mode, hang_max_seconds=10)
        gate.reset_breaker()
        response = gate.identify(frame)
        assert (response.decision, response.member_id, response.engine) == (
            GRANTED,
            "m-alex",
            pb.ENGINE_LOCAL,
        ), mode
        assert engines(response)["azure"] == outcome, mode
        detail = next(r.detail for r in response.engines if r.engine == pb.ENGINE_AZURE)
        assert detail, mode


def test_a_group_deleted_behind_our_back_is_an_error_not_a_crash(
    emu: RunningEmulator, tmp_path: Path, faces: Faces
) -> None:
    with cloud_gate(emu, tmp_path, azure_group_id="never-created") as other:
        response = other.identify(faces.read("people/joe_biden/2.jpg"))
    assert response.engine == pb.ENGINE_LOCAL
    report = next(r for r in response.engines if r.engine == pb.ENGINE_AZURE)
    assert report.outcome == pb.ENGINE_OUTCOME_ERROR
    assert "LargePersonGroupNotFound" in report.detail


def test_an_untrained_group_is_not_trained_not_an_outage(
    emu: RunningEmulator, tmp_path: Path, faces: Faces
) -> None:
    with cloud_gate(emu, tmp_path, azure_group_id="fresh-group") as other:
        other.server.gate.replayer.face.ensure_group()  # type: ignore[union-attr]
        response = other.identify(faces.read("people/joe_biden/2.jpg"))
        assert engines(response)["azure"] == "NOT_TRAINED"
        assert other.router.breaker.state.value == "closed"


def test_a_wrong_key_is_reported_and_the_local_engine_answers(
    emu: RunningEmulator, tmp_path: Path, faces: Faces
) -> None:
    with cloud_gate(emu, tmp_path, key="wrong-key") as other:
        response = other.identify(faces.read("people/joe_biden/2.jpg"))
    report = next(r for r in response.engines if r.engine == pb.ENGINE_AZURE)
    assert report.outcome == pb.ENGINE_OUTCOME_ERROR
    assert "401" in report.detail
    assert "wrong-key" not in report.detail
