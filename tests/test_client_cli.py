"""The `facegate` command against a fake FaceGate server.

`FakeFaceGateServicer` is a test double of the server with canned members, decisions and
events, served by a real gRPC server on a free port. The command runs through its real
entry points (`python -m facegate_client.cli` and the `facegate` console script) in a
subprocess, and in-process through `main(argv)` for the finer cases.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client import cli
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tests.helpers import serving

T0 = datetime(2026, 11, 26, 23, 0, 0, tzinfo=UTC)
KIM = b"kim-frame"
TWO = b"two-faces"
SLOW = b"slow"


def timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(when)
    return value


def millis(ms: int) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(ms)
    return value


def abort(
    context: grpc.ServicerContext,
    code: int,
    message: str,
    reason: str,
    violations: tuple[tuple[str, str], ...] = (),
) -> None:
    details = [any_pb2.Any(), any_pb2.Any()]
    details[0].Pack(error_details_pb2.ErrorInfo(reason=reason, domain="facegate.v1"))
    details[1].Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
    )
    status = status_pb2.Status(code=code, message=message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


def canned_members() -> dict[str, pb.Member]:
    return {
        m.member_id: m
        for m in [
            pb.Member(
                member_id="m-1001",
                display_name="Kim Jiwoo",
                face_count=2,
                create_time=timestamp(T0),
                update_time=timestamp(T0),
            ),
            pb.Member(
                member_id="m-1002",
                display_name="Lee Minho",
                face_count=1,
                create_time=timestamp(T0 + timedelta(minutes=5)),
            ),
            pb.Member(member_id="m-1003", face_count=3, create_time=timestamp(T0 + timedelta(1))),
        ]
    }


def canned_events() -> list[pb.AccessEvent]:
    """Five decisions, newest first."""
    rows = [
        (5, 62 + 240, "gate-2", "", pb.DECISION_DENIED_UNKNOWN_FACE, 0.21, 150),
        (4, 62 + 180, "gate-1", "m-1002", pb.DECISION_GRANTED, 0.88, 140),
        (3, 62 + 120, "gate-1", "", pb.DECISION_DENIED_NO_FACE, 0.0, 90),
        (2, 62 + 60, "gate-2", "m-1001", pb.DECISION_GRANTED, 0.91, 151),
        (1, 62, "gate-1", "m-1001", pb.DECISION_GRANTED, 0.93, 148),
    ]
    return [
        pb.AccessEvent(
            event_id=event_id,
            time=timestamp(T0 + timedelta(seconds=seconds)),
            turnstile_id=turnstile,
            member_id=member_id,
            decision=decision,
            engine=pb.ENGINE_LOCAL,
            confidence=confidence,
            server_latency=millis(latency),
        )
        for event_id, seconds, turnstile, member_id, decision, confidence, latency in rows
    ]


@dataclass
class FakeFaceGateServicer(pb_grpc.FaceGateServiceServicer):
    """A test double of the FaceGate server: canned answers, rich errors."""

    members: dict[str, pb.Member] = field(default_factory=canned_members)
    events: list[pb.AccessEvent] = field(default_factory=canned_events)
    requests: list[Any] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    reconciling: list[pb.Reconciliation] = field(default_factory=list)
    """The running reconciliation; it has finished when a report_only request finds it."""
    polls_to_finish: int = 1

    def SyncCloud(self, request: pb.SyncCloudRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        answer = pb.SyncCloudResponse()
        if request.report_only and self.reconciling:
            self.polls_to_finish -= 1
            if self.polls_to_finish > 0:
                answer.running.CopyFrom(self.reconciling[0])
                return answer
            done = self.reconciling.pop()
            done.phase, done.changes_found = "done", 1
            answer.finished.CopyFrom(done)
            answer.changes.add(
                kind=pb.SYNC_CHANGE_KIND_ORPHAN_PERSON,
                member_id="m-9",
                person_id="p-9",
                detail="would be deleted from the cloud",
            )
            return answer
        if not request.report_only:
            self.reconciling.append(
                pb.Reconciliation(reconciliation_id=7, dry_run=request.dry_run, phase="persons")
            )
            answer.running.CopyFrom(self.reconciling[0])
        return answer

    def Identify(self, request: pb.IdentifyRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        if not request.image:
            abort(
                context,
                code_pb2.INVALID_ARGUMENT,
                "image is empty",
                "IMAGE_EMPTY",
                (("image", "must hold an encoded image"),),
            )
        if request.image == SLOW:
            self.release.wait(timeout=1.0)
        if request.image == KIM:
            return pb.IdentifyResponse(
                decision=pb.DECISION_GRANTED,
                member_id="m-1001",
                display_name="Kim Jiwoo",
                confidence=0.93,
                engine=pb.ENGINE_LOCAL,
                face_box=pb.FaceBox(left=10, top=20, width=100, height=120),
                server_latency=millis(148),
                event_id=6,
            )
        if request.image == TWO:
            return pb.IdentifyResponse(
                decision=pb.DECISION_DENIED_MULTIPLE_FACES,
                engine=pb.ENGINE_LOCAL,
                server_latency=millis(150),
                event_id=7,
                hint="one person at a time",
            )
        return pb.IdentifyResponse(
            decision=pb.DECISION_DENIED_UNKNOWN_FACE,
            confidence=0.21,
            engine=pb.ENGINE_AZURE,
            server_latency=millis(150),
            event_id=8,
        )

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        if request.image == SLOW:
            self.release.wait(timeout=1.0)
        if (request.image, request.member_id) == (KIM, "m-1001"):
            return pb.VerifyResponse(
                decision=pb.DECISION_GRANTED,
                member_id="m-1001",
                display_name="Kim Jiwoo",
                confidence=0.93,
                engine=pb.ENGINE_LOCAL,
                server_latency=millis(149),
                event_id=9,
            )
        return pb.VerifyResponse(
            decision=pb.DECISION_DENIED_NOT_THIS_MEMBER,
            engine=pb.ENGINE_LOCAL,
            server_latency=millis(151),
            event_id=10,
        )

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        if request.member_id in self.members:
            abort(
                context,
                code_pb2.ALREADY_EXISTS,
                f"member {request.member_id!r} is already enrolled",
                "MEMBER_ALREADY_EXISTS",
            )
        member = pb.Member(
            member_id=request.member_id,
            display_name=request.display_name,
            face_count=len(request.photos),
            create_time=timestamp(T0),
        )
        self.members[member.member_id] = member
        return pb.EnrollResponse(member=member)

    def AddMemberPhotos(
        self, request: pb.AddMemberPhotosRequest, context: grpc.ServicerContext
    ) -> Any:
        self.requests.append(request)
        member = self._member(request.member_id, context)
        member.face_count += len(request.photos)
        return pb.AddMemberPhotosResponse(member=member)

    def _member(self, member_id: str, context: grpc.ServicerContext) -> pb.Member:
        if member_id not in self.members:
            abort(
                context,
                code_pb2.NOT_FOUND,
                f"no member with id {member_id!r}",
                "MEMBER_NOT_FOUND",
            )
        return self.members[member_id]

    def GetMember(self, request: pb.GetMemberRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        return pb.GetMemberResponse(member=self._member(request.member_id, context))

    def ListMembers(self, request: pb.ListMembersRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        ids = sorted(self.members)
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return pb.ListMembersResponse(
            members=[self.members[i] for i in ids[start:end]],
            next_page_token=str(end) if end < len(ids) else "",
        )

    def DeleteMember(self, request: pb.DeleteMemberRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        self._member(request.member_id, context)
        del self.members[request.member_id]
        return pb.DeleteMemberResponse()

    def ListAccessEvents(
        self, request: pb.ListAccessEventsRequest, context: grpc.ServicerContext
    ) -> Any:
        self.requests.append(request)
        matching = [
            e
            for e in self.events
            if request.member_id in ("", e.member_id)
            and request.turnstile_id in ("", e.turnstile_id)
        ]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        return pb.ListAccessEventsResponse(
            events=matching[start:end], next_page_token=str(end) if end < len(matching) else ""
        )


@dataclass
class FakeEntryPoint:
    name: str
    load: Callable[[], Any]


def no_module() -> Any:
    raise ModuleNotFoundError("No module named 'facegate_server'")


def fake_entry_points(*entries: FakeEntryPoint) -> Callable[..., list[FakeEntryPoint]]:
    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        return list(entries) if group == "facegate.commands" else []

    return entry_points


@dataclass
class Served:
    servicer: FakeFaceGateServicer
    target: str

    def requests_of(self, kind: type[Any]) -> list[Any]:
        return [r for r in self.servicer.requests if isinstance(r, kind)]


@pytest.fixture
def served() -> Iterator[Served]:
    servicer = FakeFaceGateServicer()
    with serving(servicer) as target:
        yield Served(servicer, target)


@pytest.fixture(autouse=True)
def no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs see no `facegate.commands` plugins (subprocess runs see the real ones)."""
    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points())


@pytest.fixture
def frames(tmp_path: Path) -> dict[str, Path]:
    paths = {"kim": KIM, "two": TWO, "stranger": b"someone", "empty": b"", "slow": SLOW}
    for name, data in paths.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
    return {name: tmp_path / f"{name}.jpg" for name in paths}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m facegate_client.cli ARGS` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "facegate_client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `main(ARGS)` in this process, with no plugins installed unless a test adds some."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- through the real entry point


def test_identify_plain(served: Served, frames: dict[str, Path]) -> None:
    result = run_cli(
        "identify", str(frames["kim"]), "--turnstile-id", "gate-1", "--target", served.target
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == 'GRANTED m-1001 "Kim Jiwoo" confidence 0.93 (local) 148 ms\n'
    (request,) = served.requests_of(pb.IdentifyRequest)
    assert (request.image, request.turnstile_id) == (KIM, "gate-1")


def test_identify_json(served: Served, frames: dict[str, Path]) -> None:
    result = run_cli("identify", str(frames["kim"]), "--json", "--target", served.target)
    assert (result.returncode, result.stderr) == (0, "")
    data = json.loads(result.stdout)
    assert data["decision"] == "DECISION_GRANTED"
    assert data["member_id"] == "m-1001"
    assert data["display_name"] == "Kim Jiwoo"
    assert data["face_box"] == {"left": 10, "top": 20, "width": 100, "height": 120}
    assert data["server_latency"] == "0.148s"
    assert served.requests_of(pb.IdentifyRequest)[0].turnstile_id == "cli"


def test_verify_plain(served: Served, frames: dict[str, Path]) -> None:
    result = run_cli(
        "verify", "--member-id", "m-1001", str(frames["kim"]), "--turnstile-id", "gate-1",
        "--target", served.target,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == 'GRANTED m-1001 "Kim Jiwoo" confidence 0.93 (local) 149 ms\n'
    (request,) = served.requests_of(pb.VerifyRequest)
    assert (request.member_id, request.image, request.turnstile_id) == ("m-1001", KIM, "gate-1")


def test_verify_json(served: Served, frames: dict[str, Path]) -> None:
    result = run_cli(
        "verify", "--member-id", "m-1002", str(frames["kim"]), "--json", "--target", served.target
    )
    assert (result.returncode, result.stderr) == (0, "")
    data = json.loads(result.stdout)
    assert data["decision"] == "DECISION_DENIED_NOT_THIS_MEMBER"
    assert (data["member_id"], data["confidence"], data["event_id"]) == ("", 0.0, "10")
    assert served.requests_of(pb.VerifyRequest)[0].turnstile_id == "cli"


def test_members_list_all_pages(served: Served) -> None:
    result = run_cli("members", "list", "--page-size", "2", "--target", served.target)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        'm-1001  "Kim Jiwoo"  2 faces  enrolled 2026-11-26T23:00:00Z',
        'm-1002  "Lee Minho"  1 face  enrolled 2026-11-26T23:05:00Z',
        'm-1003  ""  3 faces  enrolled 2026-11-27T23:00:00Z',
    ]
    assert [r.page_token for r in served.requests_of(pb.ListMembersRequest)] == ["", "2"]


def test_enroll_with_a_missing_photo_is_a_usage_error(
    served: Served, frames: dict[str, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.jpg"
    result = run_cli(
        "enroll", "--member-id", "m-2000", str(frames["kim"]), str(missing), "--target",
        served.target,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: cannot read '{missing}': No such file or directory\n"
    assert served.servicer.requests == []


def test_server_error_exits_1_with_the_status(served: Served) -> None:
    result = run_cli("members", "get", "m-9999", "--target", served.target)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: NOT_FOUND: no member with id 'm-9999' (reason MEMBER_NOT_FOUND)\n"
    )


def test_console_script_uses_facegate_target(served: Served) -> None:
    script = Path(sys.executable).parent / "facegate"
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    env = {**os.environ, "FACEGATE_TARGET": served.target}
    result = subprocess.run(
        [str(script), "members", "get", "m-1002"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (  # `members get` shows the membership too
        'm-1002  "Lee Minho"  1 face  enrolled 2026-11-26T23:05:00Z\n'
        "  valid: from - until -\n"
        "  hours: any time (site time)\n"
        "  sites: all\n"
    )


# ---------------------------------------------------------------- in process: main(argv)


def test_identify_denials(
    served: Served, frames: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", served.target)
    assert run_main(capsys, "identify", str(frames["stranger"]), *t) == (
        0,
        "DENIED_UNKNOWN_FACE confidence 0.21 (azure) 150 ms\n",
        "",
    )
    assert run_main(capsys, "identify", str(frames["two"]), *t) == (
        0,
        "DENIED_MULTIPLE_FACES confidence 0.00 (local) 150 ms [one person at a time]\n",
        "",
    )


def test_verify_denial_and_a_missing_member_id(
    served: Served, frames: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", served.target)
    assert run_main(capsys, "verify", "--member-id", "m-9", str(frames["kim"]), *t) == (
        0,
        "DENIED_NOT_THIS_MEMBER confidence 0.00 (local) 151 ms\n",
        "",
    )
    code, out, err = run_main(capsys, "verify", str(frames["kim"]), *t)
    assert (code, out) == (2, "")
    assert "--member-id" in err


def test_the_client_library_verifies_within_identifys_deadline(served: Served) -> None:
    from facegate_client import DeadlineExceeded, FaceGateClient

    with FaceGateClient(served.target, identify_timeout=0.1, timeout=30) as client:
        answer = client.verify("m-1001", KIM, "gate-3")
        assert (answer.decision, answer.member_id) == (pb.DECISION_GRANTED, "m-1001")
        with pytest.raises(DeadlineExceeded):
            client.verify("m-1001", SLOW, "gate-3")
    served.servicer.release.set()
    first = served.requests_of(pb.VerifyRequest)[0]
    assert (first.member_id, first.image, first.turnstile_id) == ("m-1001", KIM, "gate-3")


def test_sync_answers_at_once_and_waits_when_asked(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(capsys, "sync", "--dry-run", "--target", served.target)
    assert code == 0
    assert out.startswith("reconciliation 7 (dry run): persons, 0 cloud persons")
    assert "facegate sync --wait" in out
    served.servicer.reconciling.clear()
    code, out, _ = run_main(capsys, "sync", "--dry-run", "--wait", "--target", served.target)
    assert code == 0
    assert out.splitlines() == [
        "orphan_person  m-9  p-9  would be deleted from the cloud  [not applied]",
        "1 differences; would change 1",
    ]
    requests = served.requests_of(pb.SyncCloudRequest)
    assert [(r.dry_run, r.report_only) for r in requests] == [
        (True, False),
        (True, False),
        (False, True),
    ]


def test_waiting_for_a_sync_is_bounded(served: Served) -> None:
    from facegate_client import FaceGateClient

    now = [0.0]
    served.servicer.polls_to_finish = 1_000

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with FaceGateClient(served.target, timeout=30) as client:
        started = client.sync_cloud()
        with pytest.raises(TimeoutError, match="reconciliation 7 still running after 5 s"):
            client.wait_for_sync(
                started.running.reconciliation_id, timeout=5, sleep=sleep, clock=lambda: now[0]
            )
    assert now[0] == 5.0


def test_events_show_verifications_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    verified = pb.AccessEvent(
        time=timestamp(T0),
        turnstile_id="gate-1",
        decision=pb.DECISION_DENIED_NOT_THIS_MEMBER,
        engine=pb.ENGINE_LOCAL,
        server_latency=millis(150),
        kind=pb.ACCESS_KIND_VERIFY,
        claimed_member_id="m-9",
        detail="no member with this id",
    )
    assert cli.format_event(verified) == (
        "2026-11-26T23:00:00Z  gate-1  DENIED_NOT_THIS_MEMBER  -  0.00  local  150 ms"
        "  verify m-9 (no member with this id)"
    )


def test_invalid_argument_shows_reason_and_field(
    served: Served, frames: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(capsys, "identify", str(frames["empty"]), "--target", served.target)
    assert (code, out) == (1, "")
    assert err == (
        "error: INVALID_ARGUMENT: image is empty "
        "(reason IMAGE_EMPTY; image: must hold an encoded image)\n"
    )


def test_timeout_option_sets_the_deadline(
    served: Served, frames: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys, "identify", str(frames["slow"]), "--timeout", "0.1", "--target", served.target
    )
    assert (code, out) == (1, "")
    assert err.startswith("error: DEADLINE_EXCEEDED: ")


def test_enroll_add_photos_get_delete(
    served: Served, frames: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", served.target)
    photos = (str(frames["kim"]), str(frames["two"]))
    assert run_main(capsys, "enroll", "--member-id", "m-2000", "--name", "Park", *photos, *t) == (
        0,
        'm-2000  "Park"  2 faces  enrolled 2026-11-26T23:00:00Z\n',
        "",
    )
    (enroll,) = served.requests_of(pb.EnrollRequest)
    assert (enroll.display_name, list(enroll.photos)) == ("Park", [KIM, TWO])

    code, out, _ = run_main(capsys, "add-photos", "--member-id", "m-2000", photos[0], "--json", *t)
    assert code == 0
    assert json.loads(out)["face_count"] == 3

    code, out, _ = run_main(capsys, "members", "get", "m-2000", "--json", *t)
    assert (code, json.loads(out)["member_id"]) == (0, "m-2000")
    assert run_main(capsys, "members", "delete", "m-2000", *t) == (0, "deleted m-2000\n", "")
    assert run_main(capsys, "members", "delete", "m-1001", "--json", *t) == (0, "{}\n", "")
    code, _, err = run_main(capsys, "members", "delete", "m-2000", *t)
    assert (code, err.split(":")[:2]) == (1, ["error", " NOT_FOUND"])


def test_enroll_taken_id_is_already_exists(
    served: Served, frames: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(
        capsys, "enroll", "--member-id", "m-1001", str(frames["kim"]), "--target", served.target
    )
    assert code == 1
    assert err.startswith("error: ALREADY_EXISTS: member 'm-1001' is already enrolled")
    assert "reason MEMBER_ALREADY_EXISTS" in err


def test_unreadable_photo_is_named(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys, "add-photos", "--member-id", "m-1001", str(tmp_path), "--target", served.target
    )
    assert (code, out) == (2, "")
    assert err.startswith(f"error: cannot read '{tmp_path}': ")


def test_members_list_json_is_one_document(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(
        capsys, "members", "list", "--page-size", "1", "--json", "--target", served.target
    )
    assert code == 0
    data = json.loads(out)
    assert [m["member_id"] for m in data["members"]] == ["m-1001", "m-1002", "m-1003"]
    assert data.get("next_page_token", "") == ""
    assert len(served.requests_of(pb.ListMembersRequest)) == 3


def test_events_plain_with_filters(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(
        capsys,
        "events",
        "--turnstile-id", "gate-1",
        "--since", "2026-11-26T23:00:00",
        "--until", "2026-11-27T09:00:00+09:00",
        "--target", served.target,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "2026-11-26T23:04:02Z  gate-1  GRANTED  m-1002  0.88  local  140 ms",
        "2026-11-26T23:03:02Z  gate-1  DENIED_NO_FACE  -  0.00  local  90 ms",
        "2026-11-26T23:01:02Z  gate-1  GRANTED  m-1001  0.93  local  148 ms",
    ]
    (request,) = served.requests_of(pb.ListAccessEventsRequest)
    assert (request.turnstile_id, request.member_id, request.page_size) == ("gate-1", "", 50)
    assert request.start_time.ToDatetime(tzinfo=UTC) == T0  # no offset: UTC
    assert request.end_time.ToDatetime(tzinfo=UTC) == datetime(2026, 11, 27, tzinfo=UTC)


def test_events_limit_and_json(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "events", "--limit", "3", "--json", "--target", served.target)
    assert code == 0
    data = json.loads(out)
    assert [e["event_id"] for e in data["events"]] == ["5", "4", "3"]  # int64 is a JSON string
    assert data["events"][1]["member_id"] == "m-1002"
    assert data["events"][1]["turnstile_id"] == "gate-1"

    code, out, _ = run_main(
        capsys, "events", "--member-id", "m-1001", "--limit", "0", "--target", served.target
    )
    assert (code, len(out.splitlines())) == (0, 2)


@pytest.mark.parametrize(
    "argv",
    [
        ["events", "--since", "yesterday"],
        ["events", "--limit", "-1"],
        ["identify", "x.jpg", "--timeout", "0"],
        ["enroll", "x.jpg"],
        ["members"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, *argv)
    assert (code, out) == (2, "")
    assert "usage: facegate" in err


def test_help_names_the_server_package(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    assert "Server commands (serve, ...) come with the facegate-server package." in out


# ---------------------------------------------------------------- plugins


def register_fake_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser("fake-serve", help="a plugged-in command")
    parser.add_argument("--port", type=int, default=0)
    parser.set_defaults(func=lambda args: 40 + args.port)


def test_plugins_add_commands_and_broken_ones_are_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        fake_entry_points(
            FakeEntryPoint("serve", no_module),
            FakeEntryPoint("fake-serve", lambda: register_fake_serve),
        ),
    )
    assert run_main(capsys, "fake-serve", "--port", "2") == (42, "", "")
    code, out, err = run_main(capsys, "--help")
    assert (code, err) == (0, "")
    assert "fake-serve" in out
    assert "a plugged-in command" in out

    code, _, err = run_main(capsys, "serve")
    assert code == 2
    assert "invalid choice: 'serve'" in err


def test_identify_line_says_why_the_cloud_did_not_decide() -> None:
    from facegate_client.cli import format_identify

    response = pb.IdentifyResponse(
        decision=pb.DECISION_GRANTED,
        member_id="m-1001",
        confidence=0.93,
        engine=pb.ENGINE_LOCAL,
        engines=[
            pb.EngineReport(engine=pb.ENGINE_LOCAL, outcome=pb.ENGINE_OUTCOME_DECIDED),
            pb.EngineReport(engine=pb.ENGINE_AZURE, outcome=pb.ENGINE_OUTCOME_TIMED_OUT),
        ],
    )
    response.server_latency.FromMilliseconds(1101)
    assert format_identify(response) == (
        "GRANTED m-1001 confidence 0.93 (local) 1101 ms {azure: timed out}"
    )
