"""Issue 11's "done when", end to end: FaceGate's server, the real SDK and the strict
emulator (its clock moved by the test): a member enrolled during a 30-s training, a member
whose photo the cloud refuses and ten members behind it; no runner-up's grant; Limited
Access denied in each form costs no transactions after the readiness check; the F0 quota
pauses and resumes the outbox; a 429 without Retry-After is waited out as its message says;
two servers with different stores on one group keep each other's persons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_azure_emulator import EmulatorSettings, ManualClock, RunningEmulator, start_emulator
from facegate_client.cli import format_status
from facegate_server.cloud.sync import Training
from facegate_server.engines.memory import MemoryEngine

from tests.cloud import KEY, CloudGate, cloud_gate, emulator, engines
from tests.conftest import Faces
from tests.test_cloud_path import photo

PEOPLE = [
    "barack_obama",
    "joe_biden",
    "kit_harington",
    "rose_leslie",
    "alex_lacamoire",
    "lin_manuel_miranda",
]


def enroll(gate: CloudGate, member_id: str, *photos: bytes) -> None:
    gate.stub.Enroll(pb.EnrollRequest(member_id=member_id, photos=list(photos)), timeout=60)


def status(gate: CloudGate) -> pb.GetStatusResponse:
    answer: pb.GetStatusResponse = gate.stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    return answer


def members(gate: CloudGate) -> dict[str, int]:
    """This store's persons in the emulator: member id -> faces."""
    face = gate.server.gate.replayer.face  # type: ignore[union-attr]
    found: dict[str, int] = {}
    for person in face.persons():
        member = face.member_of(person)
        if member is not None:
            assert member not in found, f"two persons for {member}"
            found[member] = len(person.persisted_face_ids)
    return found


def advance(gate: CloudGate, seconds: float) -> None:
    gate.clock.advance(seconds)
    gate.emulator.settings.clock.advance(seconds)  # type: ignore[attr-defined]


@pytest.fixture
def training30(faces: Faces) -> Iterator[RunningEmulator]:
    settings = EmulatorSettings(
        key=KEY, training_seconds=30, workers=1, clock=ManualClock(), rate_per_second=0
    )
    with start_emulator(settings) as running:
        yield running


def test_a_training_a_refused_photo_and_ten_behind_it_all_end_explained(
    training30: RunningEmulator, faces: Faces, tmp_path: Path
) -> None:
    with cloud_gate(training30, tmp_path, engine=MemoryEngine()) as gate:
        cloud = gate.server.gate.replayer
        assert cloud is not None
        enroll(gate, "m-first", faces.read(faces.of("barack_obama")[0]))
        cloud.run_once()  # the first training starts: 30 s on the emulator's clock
        assert cloud.training is Training.RUNNING
        enroll(gate, "m-during", faces.read(faces.of("joe_biden")[0]))
        enroll(gate, "m-refused", photo(42, (400, 400)))  # no face: InvalidImage
        for n in range(10):
            person = PEOPLE[n % len(PEOPLE)]
            enroll(gate, f"m-{n}", faces.read(faces.of(person)[n // len(PEOPLE)]))
        cloud.run_once()
        state = status(gate)
        assert state.cloud_training == "running (one more queued)"
        assert state.outbox_depth == 0 and state.outbox_parked == 1
        assert state.parked[0].member_id == "m-refused"
        assert "InvalidImage" in state.parked[0].reason
        assert state.circuit_state == pb.CIRCUIT_STATE_CLOSED  # enrolment work: not the doors'
        assert "outbox parked: 1" in format_status(state)
        gate.settle()
        state = status(gate)
        assert state.cloud_training == "idle" and state.outbox_parked == 1
        assert state.circuit_state == pb.CIRCUIT_STATE_CLOSED
        found = members(gate)
        for member in ["m-first", "m-during", *(f"m-{n}" for n in range(10))]:
            assert found.get(member) == 1, member
        assert found.get("m-refused", 0) == 0
        assert gate.server.store.cloud_person("m-during").ready  # type: ignore[union-attr]
        counts = gate.emulator.admin.counts()
        assert counts.get("LargePersonGroup_Train", 0) == 2  # the first and one queued


def test_no_grant_goes_to_a_deleted_members_runner_up(faces: Faces, tmp_path: Path) -> None:
    with emulator(snapshot_keeps_deleted=True) as emu, cloud_gate(emu, tmp_path) as gate:
        obama = faces.of("barack_obama")
        enroll(gate, "m-obama", faces.read(obama[0]), faces.read(obama[1]))
        enroll(gate, "m-biden", faces.read(faces.of("joe_biden")[0]))
        gate.settle()
        frame = faces.read(obama[2])
        assert gate.identify(frame).member_id == "m-obama"
        gate.stub.DeleteMember(pb.DeleteMemberRequest(member_id="m-obama"), timeout=10)
        gate.server.gate.replayer.run_once()  # type: ignore[union-attr]  # deleted in the cloud
        # The snapshot still has the deleted person on top: the cloud's answer counts for
        # nothing and the local engine decides (it no longer knows m-obama).
        answer = gate.identify(frame)
        assert answer.decision != pb.DECISION_GRANTED, answer
        assert engines(answer)["azure"] == "NOT_USED"
        assert status(gate).circuit_state == pb.CIRCUIT_STATE_CLOSED


@pytest.mark.parametrize(
    ("mode", "form"),
    [("denied", "inner-error"), ("denied", "unsupported-feature"), ("no-face-id", "")],
)
def test_without_limited_access_identify_costs_nothing_after_the_check(
    faces: Faces, tmp_path: Path, mode: str, form: str
) -> None:
    with emulator() as emu, cloud_gate(emu, tmp_path) as gate:
        enroll(gate, "m-kit", faces.read(faces.of("kit_harington")[0]))
        gate.settle()
        emu.admin.set_limited_access(mode, form or "inner-error")
        cloud = gate.server.gate.replayer
        assert cloud is not None
        frame = faces.read(faces.of("kit_harington")[1])
        gate.identify(frame)  # the detect is refused, or has no faceId: the cloud turns off
        cloud.run_once()  # the readiness check agrees
        state = status(gate)
        assert state.cloud_readiness.startswith("off"), state.cloud_readiness
        assert "aka.ms/facerecognition" in state.cloud_readiness
        emu.admin.reset_counts()
        for _ in range(3):
            answer = gate.identify(frame)
            assert (answer.decision, answer.member_id) == (pb.DECISION_GRANTED, "m-kit")
            assert engines(answer)["azure"] == "NOT_USED"
        assert emu.admin.counts() == {}  # not one transaction
        emu.admin.set_limited_access("granted")
        advance(gate, 301)
        cloud.run_once()  # the check passes: the cloud is back
        assert status(gate).cloud_readiness == "ready"
        assert gate.identify(frame).engine == pb.ENGINE_AZURE


def test_a_spent_quota_pauses_the_outbox_until_it_is_replenished(
    faces: Faces, tmp_path: Path
) -> None:
    with emulator(tier="F0") as emu, cloud_gate(emu, tmp_path) as gate:
        cloud = gate.server.gate.replayer
        assert cloud is not None
        cloud.run_once()  # ready
        emu.admin.set_quota(0)
        enroll(gate, "m-rose", faces.read(faces.of("rose_leslie")[0]))
        cloud.run_once()
        state = status(gate)
        assert state.cloud_readiness.startswith("paused") and "quota" in state.cloud_readiness
        assert state.outbox_depth == 1 and state.outbox_parked == 0
        emu.admin.set_quota(1000)
        advance(gate, 301)
        gate.settle()
        assert members(gate) == {"m-rose": 1}


def test_a_429_without_retry_after_waits_as_its_message_says(faces: Faces, tmp_path: Path) -> None:
    with emulator() as emu, cloud_gate(emu, tmp_path) as gate:
        cloud = gate.server.gate.replayer
        assert cloud is not None
        cloud.run_once()
        emu.admin.set_throttle("status-code", retry_after_header=False)
        emu.admin.set_rate(0.001)  # the next call is refused for a long while
        enroll(gate, "m-alex", faces.read(faces.of("alex_lacamoire")[0]))
        cloud.run_once()
        assert "429" in cloud.waiting and cloud._retry_delay > 1.0
        assert status(gate).circuit_state == pb.CIRCUIT_STATE_CLOSED
        emu.admin.set_rate(0)
        advance(gate, cloud._retry_delay)
        gate.settle()
        assert members(gate) == {"m-alex": 1}


def test_two_stores_on_one_group_keep_each_others_persons(faces: Faces, tmp_path: Path) -> None:
    with (
        emulator() as emu,
        cloud_gate(emu, tmp_path / "north", engine=MemoryEngine()) as north,
        cloud_gate(emu, tmp_path / "south", engine=MemoryEngine()) as south,
    ):
        enroll(north, "m-1", faces.read(faces.of("barack_obama")[0]))
        enroll(south, "m-2", faces.read(faces.of("joe_biden")[0]))
        north.settle()
        south.settle()
        for gate in (north, south):
            answer = gate.sync()
            assert list(answer.changes) == [] and answer.finished.changes_found == 0
        assert members(north) == {"m-1": 1} and members(south) == {"m-2": 1}
        assert len(north.persons()) == 2  # one group, both stores' persons
