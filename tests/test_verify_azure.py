"""Verify through Azure when it is primary (cloud-first), against the Face API emulator via
the real SDK: detect + verify against the member's person, two transactions, whoever is
claimed; the local engine agreeing, or deciding while the cloud is away."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_azure_emulator import RunningEmulator

from tests.cloud import CloudGate, cloud_gate, emulator, engines
from tests.conftest import Faces

NOT_THIS = pb.DECISION_DENIED_NOT_THIS_MEMBER
MEMBERS = (("m-obama", "barack_obama", 2), ("m-biden", "joe_biden", 1))


@pytest.fixture(scope="module")
def gate(faces: Faces, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudGate]:
    with emulator() as emu, cloud_gate(emu, tmp_path_factory.mktemp("data")) as running:
        for member_id, person, count in (
            ("m-obama", "barack_obama", 2),
            ("m-biden", "joe_biden", 1),
        ):
            photos = [faces.read(p) for p in faces.of(person)[:count]]
            running.stub.Enroll(pb.EnrollRequest(member_id=member_id, photos=photos), timeout=60)
        running.settle()
        yield running


@pytest.fixture(autouse=True)
def healthy(gate: CloudGate) -> Iterator[None]:
    yield
    gate.emulator.admin.set_fault("healthy")
    gate.reset_breaker()


def verify(gate: CloudGate, member_id: str, image: bytes) -> pb.VerifyResponse:
    response: pb.VerifyResponse = gate.stub.Verify(
        pb.VerifyRequest(member_id=member_id, image=image, turnstile_id="gate-1"), timeout=30
    )
    return response


def verify_calls(emu: RunningEmulator) -> int:
    return emu.admin.counts().get("Face_Verify", 0)


def test_a_member_verifies_through_azure(gate: CloudGate, faces: Faces) -> None:
    before = verify_calls(gate.emulator)
    response = verify(gate, "m-obama", faces.read(faces.of("barack_obama")[2]))
    assert (response.decision, response.member_id) == (pb.DECISION_GRANTED, "m-obama")
    assert response.engine == pb.ENGINE_AZURE
    assert engines(response) == {"azure": "DECIDED", "local": "AGREED"}
    assert 0.5 <= response.confidence <= 1.0
    assert response.cloud_transactions == 2  # detect, verify
    assert verify_calls(gate.emulator) == before + 1


def test_a_stranger_and_an_unknown_id_cost_and_get_the_same(gate: CloudGate, faces: Faces) -> None:
    frame = faces.read(faces.of("kit_harington")[0])
    stranger = verify(gate, "m-obama", frame)
    unknown = verify(gate, "m-nobody", frame)
    for response in (stranger, unknown):
        assert (response.decision, response.member_id, response.confidence) == (NOT_THIS, "", 0)
        assert response.engine == pb.ENGINE_AZURE
        assert engines(response) == {"azure": "DECIDED", "local": "AGREED"}
        assert response.cloud_transactions == 2
        assert all((r.confidence, r.detail) == (0.0, "") for r in response.engines)


def test_the_local_engine_verifies_while_the_cloud_is_down(gate: CloudGate, faces: Faces) -> None:
    gate.emulator.admin.set_fault("error500")
    response = verify(gate, "m-biden", faces.read(faces.of("joe_biden")[1]))
    assert (response.decision, response.member_id) == (pb.DECISION_GRANTED, "m-biden")
    assert response.engine == pb.ENGINE_LOCAL
    assert engines(response) == {"local": "DECIDED", "azure": "ERROR"}
