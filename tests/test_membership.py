"""Membership rules at the door: the rules themselves (validity, suspension, sites, access
hours across a real zone's daylight-saving changes and midnight), and a real server that
applies them after recognition (the in-memory engine: the same bytes are the same face),
changes them with UpdateMember, and removes members' photos."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.domain import AccessWindow, Membership, MembershipRule
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.memory import MemoryEngine
from facegate_server.membership import Site, in_window, load_zone, refusal
from google.protobuf.field_mask_pb2 import FieldMask

from tests.conftest import Faces
from tests.helpers import details, image_bytes, running_server

BERLIN = load_zone("Europe/Berlin")
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)
OFF_PEAK = tuple(AccessWindow(day, 6 * 60, 16 * 60) for day in range(MON, SAT))
"""Mon-Fri 06:00-16:00, site time."""


def at(text: str) -> datetime:
    """An instant, written in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- the rules


def test_validity_is_from_inclusive_until_exclusive() -> None:
    m = Membership(valid_from=at("2026-12-01T00:00"), valid_until=at("2027-01-01T00:00"))
    site = Site()
    assert refusal(m, at("2026-11-30T23:59:59"), site) is MembershipRule.NOT_YET_VALID
    assert refusal(m, at("2026-12-01T00:00"), site) is None
    assert refusal(m, at("2026-12-31T23:59:59"), site) is None
    assert refusal(m, at("2027-01-01T00:00"), site) is MembershipRule.EXPIRED
    assert refusal(Membership(), at("1999-01-01T00:00"), site) is None  # open both ends


def test_suspension_and_sites() -> None:
    now = at("2026-12-01T12:00")
    assert refusal(Membership(suspended=True), now, Site()) is MembershipRule.SUSPENDED
    branch_a = Membership(sites=("a", "c"))
    assert refusal(branch_a, now, Site("a")) is None
    assert refusal(branch_a, now, Site("b")) is MembershipRule.OTHER_SITE
    assert refusal(branch_a, now, Site("")) is MembershipRule.OTHER_SITE  # no site: refused
    assert refusal(Membership(), now, Site("b")) is None  # no sites: every site
    # Validity first: an expired, suspended member of another branch is told "expired".
    everything = Membership(valid_until=now, suspended=True, sites=("a",))
    assert refusal(everything, now, Site("b")) is MembershipRule.EXPIRED


def test_off_peak_hours_follow_the_zone_across_the_spring_change() -> None:
    """Berlin moves from +01:00 to +02:00 at 01:00 UTC on Sunday 29 March 2026. A fixed
    offset would be an hour wrong after it: each instant below is chosen so that it is."""
    off_peak = Membership(access_hours=OFF_PEAK)
    site = Site("a", BERLIN)
    cases = {
        "2026-03-27T09:00": None,  # Fri 10:00 CET
        "2026-03-27T17:00": MembershipRule.OUTSIDE_HOURS,  # Fri 18:00 CET
        "2026-03-27T04:59": MembershipRule.OUTSIDE_HOURS,  # Fri 05:59 CET
        "2026-03-27T05:00": None,  # Fri 06:00 CET
        "2026-03-30T04:30": None,  # Mon 06:30 CEST (05:30 at the winter offset)
        "2026-03-30T14:30": MembershipRule.OUTSIDE_HOURS,  # Mon 16:30 CEST (15:30 in winter)
        "2026-03-30T08:00": None,  # Mon 10:00 CEST
        "2026-03-30T16:00": MembershipRule.OUTSIDE_HOURS,  # Mon 18:00 CEST
        "2026-03-29T09:00": MembershipRule.OUTSIDE_HOURS,  # Sunday
    }
    for instant, expected in cases.items():
        assert refusal(off_peak, at(instant), site) is expected, instant


def test_a_window_in_the_spring_gap_never_occurs() -> None:
    """02:00-03:00 on 29 March 2026 does not exist in Berlin: nobody is let in by it."""
    gap = Membership(access_hours=(AccessWindow(SUN, 2 * 60, 3 * 60),))
    site = Site("a", BERLIN)
    start = at("2026-03-28T12:00")
    for minute in range(24 * 60):
        now = start + timedelta(minutes=minute)
        assert refusal(gap, now, site) is MembershipRule.OUTSIDE_HOURS, now
    # A week later the hour exists again.
    assert refusal(gap, at("2026-04-05T00:30"), site) is None  # Sun 02:30 CEST


def test_both_instants_of_the_autumn_overlap_are_inside() -> None:
    """02:00-03:00 happens twice in Berlin on 25 October 2026 (CEST, then CET)."""
    overlap = Membership(access_hours=(AccessWindow(SUN, 2 * 60, 2 * 60 + 30),))
    site = Site("a", BERLIN)
    assert refusal(overlap, at("2026-10-25T00:15"), site) is None  # 02:15 CEST
    assert refusal(overlap, at("2026-10-25T01:15"), site) is None  # 02:15 CET
    assert refusal(overlap, at("2026-10-25T00:45"), site) is not None  # 02:45 CEST
    assert refusal(overlap, at("2026-10-25T01:45"), site) is not None  # 02:45 CET


def test_a_window_across_midnight_belongs_to_the_day_it_starts() -> None:
    late = AccessWindow(FRI, 22 * 60, 2 * 60)  # Fri 22:00 to Sat 02:00
    local = datetime(2026, 12, 4, 21, 59)  # a Friday
    assert local.weekday() == FRI
    assert not in_window(late, local)
    assert in_window(late, local.replace(hour=22))
    assert in_window(late, local.replace(hour=23, minute=59, second=59))
    assert in_window(late, local + timedelta(hours=3))  # Sat 00:59
    assert not in_window(late, local + timedelta(hours=4, minutes=1))  # Sat 02:00
    assert not in_window(late, local + timedelta(days=2, hours=3))  # Sun 00:59: not Sat's
    sunday_night = AccessWindow(SUN, 23 * 60, 60)
    assert in_window(sunday_night, datetime(2026, 12, 7, 0, 30))  # Monday 00:30: wraps
    whole_day = AccessWindow(TUE, 0, 1440)
    assert in_window(whole_day, datetime(2026, 12, 1, 23, 59, 59))
    assert not in_window(whole_day, datetime(2026, 12, 2, 0, 0))


def test_a_window_across_midnight_on_the_night_the_clocks_change() -> None:
    """Sat 22:00 to Sun 04:00 in Berlin on 28/29 March 2026: 5 real hours, not 6."""
    night = Membership(access_hours=(AccessWindow(SAT, 22 * 60, 4 * 60),))
    site = Site("a", BERLIN)
    inside = [
        at("2026-03-28T21:00") + timedelta(minutes=m)
        for m in range(0, 8 * 60)
        if refusal(night, at("2026-03-28T21:00") + timedelta(minutes=m), site) is None
    ]
    assert inside[0] == at("2026-03-28T21:00")  # 22:00 CET
    assert inside[-1] == at("2026-03-29T01:59")  # 03:59 CEST
    assert len(inside) == 5 * 60


def test_the_zone_comes_from_the_tzdata_package() -> None:
    from facegate_server.config import SettingsError, load_settings

    assert load_zone("America/New_York").key == "America/New_York"
    for bad in ("Mars/Olympus", "../../etc/passwd", "Europe", ""):
        with pytest.raises(ValueError):
            load_zone(bad)
    assert load_settings({"FACEGATE_SITE_TIME_ZONE": "Europe/Berlin"}).site_time_zone
    with pytest.raises(SettingsError, match="FACEGATE_SITE_TIME_ZONE=Mars/Olympus"):
        load_settings({"FACEGATE_SITE_TIME_ZONE": "Mars/Olympus"})
    with pytest.raises(SettingsError, match="FACEGATE_SITE_ID"):
        load_settings({"FACEGATE_SITE_ID": "branch a"})
    assert load_settings({"FACEGATE_SITE_ID": "berlin-mitte"}).site_id == "berlin-mitte"


def test_the_index_forgets_one_template_and_keeps_the_others() -> None:
    rng = np.random.default_rng(7)
    a1, a2, b = rng.normal(size=(3, 128))
    index = FaceIndex([("a", a1), ("a", a2), ("b", b)])
    assert index.remove_template("a", a1)
    assert not index.remove_template("a", a1)  # gone already
    assert not index.remove_template("b", a2)  # not b's
    assert len(index) == 2 and index.has("a")
    match = index.match(a1 + 0.001)
    assert match is not None and match.member_id in ("a", "b")
    assert index.match(a2)
    assert index.nearest(a2, 1)[0] == ("a", pytest.approx(0.0, abs=1e-3))


# -- a server


class WallClock:
    """The gate's wall clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def set(self, now: datetime) -> None:
        with self._lock:
            self.now = now


def face(n: int) -> bytes:
    """A distinct "face" for the in-memory engine (its bytes are its identity)."""
    return image_bytes(40 + n, 40, "PNG")


Stub = pb_grpc.FaceGateServiceStub


class Door:
    def __init__(self, stub: Stub, clock: WallClock) -> None:
        self.stub, self.clock = stub, clock

    def identify(self, photo: bytes, turnstile: str = "gate-1") -> pb.IdentifyResponse:
        answer: pb.IdentifyResponse = self.stub.Identify(
            pb.IdentifyRequest(image=photo, turnstile_id=turnstile), timeout=10
        )
        return answer

    def enroll(
        self, member_id: str, *photos: bytes, membership: pb.Membership | None = None
    ) -> pb.Member:
        response: pb.EnrollResponse = self.stub.Enroll(
            pb.EnrollRequest(member_id=member_id, photos=list(photos), membership=membership),
            timeout=10,
        )
        return response.member

    def update(self, member: pb.Member, *paths: str) -> pb.Member:
        response: pb.UpdateMemberResponse = self.stub.UpdateMember(
            pb.UpdateMemberRequest(member=member, update_mask=FieldMask(paths=list(paths))),
            timeout=10,
        )
        return response.member


@pytest.fixture
def door(tmp_path: Path) -> Iterator[Door]:
    """Branch "a" in Berlin, on a Monday morning in December."""
    clock = WallClock(at("2026-12-07T09:00"))  # Mon 10:00 CET
    with (
        running_server(
            tmp_path,
            engine=MemoryEngine(),
            wall_clock=clock,
            site_id="a",
            site_time_zone="Europe/Berlin",
        ) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield Door(pb_grpc.FaceGateServiceStub(channel), clock)


def membership(**fields: object) -> pb.Membership:
    m = pb.Membership()
    for name in ("valid_from", "valid_until"):
        if name in fields:
            getattr(m, name).FromDatetime(fields.pop(name))
    for name, value in fields.items():
        if isinstance(value, list | tuple):
            getattr(m, name).extend(value)
        else:
            setattr(m, name, value)
    return m


def off_peak() -> list[pb.AccessWindow]:
    return [
        pb.AccessWindow(day=pb.DayOfWeek.ValueType(d + 1), start_minute=360, end_minute=960)
        for d in range(5)
    ]


def test_an_expired_member_is_refused_with_their_id_and_granted_once_extended(
    door: Door,
) -> None:
    yesterday = door.clock() - timedelta(days=1)
    door.enroll("m-1", face(1), membership=membership(valid_until=yesterday))
    answer = door.identify(face(1))
    assert answer.decision == pb.DECISION_DENIED_MEMBERSHIP_INACTIVE
    assert answer.membership_rule == pb.MEMBERSHIP_RULE_EXPIRED
    assert answer.member_id == "m-1"
    assert "front desk" in answer.hint
    assert answer.display_name == ""

    extended = door.update(
        pb.Member(
            member_id="m-1",
            membership=membership(valid_until=door.clock() + timedelta(days=365)),
        ),
        "membership.valid_until",
    )
    assert extended.membership.valid_until.ToDatetime(UTC) > door.clock()
    granted = door.identify(face(1))
    assert (granted.decision, granted.member_id) == (pb.DECISION_GRANTED, "m-1")
    assert granted.membership_rule == pb.MEMBERSHIP_RULE_UNSPECIFIED

    # The access log says who was turned away, and by which rule.
    refused = door.stub.ListAccessEvents(
        pb.ListAccessEventsRequest(decisions=[pb.DECISION_DENIED_MEMBERSHIP_INACTIVE]), timeout=5
    ).events
    assert [(e.member_id, e.membership_rule) for e in refused] == [
        ("m-1", pb.MEMBERSHIP_RULE_EXPIRED)
    ]
    assert refused[0].event_id == answer.event_id
    by_rule = door.stub.ListAccessEvents(
        pb.ListAccessEventsRequest(membership_rule=pb.MEMBERSHIP_RULE_EXPIRED), timeout=5
    ).events
    assert [e.event_id for e in by_rule] == [answer.event_id]
    both = door.stub.ListAccessEvents(
        pb.ListAccessEventsRequest(
            decisions=[pb.DECISION_GRANTED, pb.DECISION_DENIED_MEMBERSHIP_INACTIVE]
        ),
        timeout=5,
    ).events
    assert [e.event_id for e in both] == [granted.event_id, answer.event_id]


def test_an_off_peak_member_across_a_dst_change(door: Door) -> None:
    door.enroll("m-off", face(2), membership=membership(access_hours=off_peak()))
    for instant, decision in [
        ("2026-03-27T17:00", pb.DECISION_DENIED_OUTSIDE_HOURS),  # Fri 18:00 CET
        ("2026-03-27T09:00", pb.DECISION_GRANTED),  # Fri 10:00 CET
        ("2026-03-30T16:00", pb.DECISION_DENIED_OUTSIDE_HOURS),  # Mon 18:00 CEST
        ("2026-03-30T08:00", pb.DECISION_GRANTED),  # Mon 10:00 CEST
        ("2026-03-30T04:30", pb.DECISION_GRANTED),  # Mon 06:30 CEST
        ("2026-03-30T14:30", pb.DECISION_DENIED_OUTSIDE_HOURS),  # Mon 16:30 CEST
    ]:
        door.clock.set(at(instant))
        answer = door.identify(face(2))
        assert (answer.decision, answer.member_id) == (decision, "m-off"), instant
        events = door.stub.ListAccessEvents(pb.ListAccessEventsRequest(page_size=1), timeout=5)
        assert events.events[0].time.ToDatetime(UTC) == at(instant)  # the gate's clock


def test_a_member_of_another_branch_and_a_suspended_member(door: Door) -> None:
    door.enroll("m-b", face(3), membership=membership(sites=["b"]))
    answer = door.identify(face(3))
    assert (answer.decision, answer.member_id, answer.membership_rule) == (
        pb.DECISION_DENIED_OTHER_SITE,
        "m-b",
        pb.MEMBERSHIP_RULE_OTHER_SITE,
    )
    door.update(
        pb.Member(member_id="m-b", membership=membership(sites=["a", "b"])), "membership.sites"
    )
    assert door.identify(face(3)).decision == pb.DECISION_GRANTED

    suspended = door.update(
        pb.Member(
            member_id="m-b",
            membership=membership(suspended=True, suspension_reason="unpaid"),
        ),
        "membership.suspended",
    )
    assert (suspended.membership.suspension_reason, list(suspended.membership.sites)) == (
        "unpaid",
        ["a", "b"],  # a change to one field never overwrites another
    )
    answer = door.identify(face(3))
    assert answer.decision == pb.DECISION_DENIED_MEMBERSHIP_INACTIVE
    assert answer.membership_rule == pb.MEMBERSHIP_RULE_SUSPENDED
    assert "unpaid" not in answer.hint  # the gym's reason stays with the gym
    resumed = door.update(
        pb.Member(member_id="m-b", membership=pb.Membership(suspended=False)),
        "membership.suspended",
    )
    assert (resumed.membership.suspended, resumed.membership.suspension_reason) == (False, "")
    assert door.identify(face(3)).decision == pb.DECISION_GRANTED


def test_recognition_outcomes_come_first(door: Door) -> None:
    """A stranger or an ambiguous face is decided as such: no rule reveals a match."""
    expired = membership(valid_until=door.clock() - timedelta(days=1))
    door.enroll("m-x", face(4), membership=expired)
    door.enroll("m-y", face(4))  # the same face: ambiguous between them
    ambiguous = door.identify(face(4))
    assert (ambiguous.decision, ambiguous.member_id, ambiguous.membership_rule) == (
        pb.DECISION_DENIED_AMBIGUOUS,
        "",
        pb.MEMBERSHIP_RULE_UNSPECIFIED,
    )
    stranger = door.identify(face(5))
    assert (stranger.decision, stranger.member_id) == (pb.DECISION_DENIED_UNKNOWN_FACE, "")
    no_face = door.identify(image_bytes(64, 64, "JPEG"))
    assert no_face.decision in (pb.DECISION_DENIED_UNKNOWN_FACE, pb.DECISION_DENIED_NO_FACE)
    assert no_face.membership_rule == pb.MEMBERSHIP_RULE_UNSPECIFIED


def test_update_member_changes_only_the_masked_fields(door: Door) -> None:
    door.enroll(
        "m-u",
        face(6),
        membership=membership(
            valid_until=at("2027-06-01T00:00"), sites=["a"], access_hours=off_peak()
        ),
    )
    renamed = door.update(
        pb.Member(member_id="m-u", display_name="Kim Jiwoo", membership=pb.Membership()),
        "display_name",
    )
    assert renamed.display_name == "Kim Jiwoo"
    assert renamed.membership.valid_until.ToDatetime(UTC) == at("2027-06-01T00:00")
    assert list(renamed.membership.sites) == ["a"] and len(renamed.membership.access_hours) == 5
    opened = door.update(
        pb.Member(member_id="m-u"), "membership.valid_until", "membership.access_hours"
    )
    assert not opened.membership.HasField("valid_until")  # named and unset: cleared
    assert not opened.membership.access_hours
    assert opened.display_name == "Kim Jiwoo" and list(opened.membership.sites) == ["a"]
    got = door.stub.GetMember(pb.GetMemberRequest(member_id="m-u"), timeout=5).member
    assert got == opened
    whole = door.update(pb.Member(member_id="m-u"), "membership")
    assert whole.membership == pb.Membership() and whole.display_name == "Kim Jiwoo"

    for paths, reason in [
        ((), "UPDATE_MASK_MISSING"),
        (("face_count",), "UPDATE_MASK_INVALID"),
        (("membership.nonsense",), "UPDATE_MASK_INVALID"),
    ]:
        with pytest.raises(grpc.RpcError) as refused:
            door.update(pb.Member(member_id="m-u"), *paths)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(refused.value)[0] == reason
    with pytest.raises(grpc.RpcError) as missing:
        door.update(pb.Member(member_id="nobody"), "display_name")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    backwards = membership(valid_from=at("2027-01-01T00:00"), valid_until=at("2026-01-01T00:00"))
    bad_window = pb.Membership(
        access_hours=[pb.AccessWindow(day=pb.DAY_OF_WEEK_MONDAY, start_minute=60, end_minute=60)]
    )
    no_day = pb.Membership(access_hours=[pb.AccessWindow(start_minute=60, end_minute=120)])
    for bad, field in [
        (backwards, "member.membership.valid_until"),
        (bad_window, "member.membership.access_hours[0]"),
        (no_day, "member.membership.access_hours[0].day"),
        (pb.Membership(sites=["no spaces"]), "member.membership.sites[0]"),
    ]:
        with pytest.raises(grpc.RpcError) as invalid:
            door.update(pb.Member(member_id="m-u", membership=bad), "membership")
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(invalid.value)[1][0][0] == field
    with pytest.raises(grpc.RpcError) as at_enrol:
        door.enroll("m-v", face(7), membership=backwards)
    assert details(at_enrol.value)[1][0][0] == "membership.valid_until"


def test_a_bad_photo_is_removed_and_the_member_is_still_recognised(door: Door) -> None:
    door.enroll("m-p", face(8), face(9))
    door.enroll("m-q", face(10))
    photos = door.stub.ListMemberPhotos(pb.ListMemberPhotosRequest(member_id="m-p"), timeout=5)
    assert len(photos.photos) == 2
    first, second = photos.photos
    assert first.photo_id < second.photo_id
    assert first.create_time.ToDatetime(UTC) == door.clock()
    assert not first.photo  # photos are not kept by default
    member = door.stub.RemoveMemberPhoto(
        pb.RemoveMemberPhotoRequest(member_id="m-p", photo_id=first.photo_id), timeout=5
    ).member
    assert member.face_count == 1
    assert door.identify(face(8)).decision == pb.DECISION_DENIED_UNKNOWN_FACE  # at once
    assert (door.identify(face(9)).member_id, door.identify(face(10)).member_id) == ("m-p", "m-q")
    left = door.stub.ListMemberPhotos(pb.ListMemberPhotosRequest(member_id="m-p"), timeout=5)
    assert [p.photo_id for p in left.photos] == [second.photo_id]

    with pytest.raises(grpc.RpcError) as last:
        door.stub.RemoveMemberPhoto(
            pb.RemoveMemberPhotoRequest(member_id="m-p", photo_id=second.photo_id), timeout=5
        )
    assert last.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(last.value)[0] == "LAST_PHOTO"
    [other] = door.stub.ListMemberPhotos(
        pb.ListMemberPhotosRequest(member_id="m-q"), timeout=5
    ).photos
    with pytest.raises(grpc.RpcError) as not_theirs:
        door.stub.RemoveMemberPhoto(
            pb.RemoveMemberPhotoRequest(member_id="m-p", photo_id=other.photo_id), timeout=5
        )
    assert not_theirs.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(not_theirs.value)[0] == "PHOTO_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as nobody:
        door.stub.ListMemberPhotos(pb.ListMemberPhotosRequest(member_id="nobody"), timeout=5)
    assert nobody.value.code() == grpc.StatusCode.NOT_FOUND


def test_kept_photos_are_listed_with_their_bytes(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, engine=MemoryEngine(), keep_photos=True) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.FaceGateServiceStub(channel)
        stub.Enroll(pb.EnrollRequest(member_id="m-k", photos=[face(11)]), timeout=10)
        ask = pb.ListMemberPhotosRequest(member_id="m-k")
        assert not stub.ListMemberPhotos(ask, timeout=5).photos[0].photo
        ask.include_photos = True
        assert stub.ListMemberPhotos(ask, timeout=5).photos[0].photo == face(11)


def test_rules_survive_a_restart(tmp_path: Path) -> None:
    """The membership, the photos' ids and the events' rules are in the SQLite file."""
    clock = WallClock(at("2026-12-07T09:00"))
    expired = membership(valid_until=at("2026-12-01T00:00"), suspended=True, sites=["a"])
    expired.suspension_reason = "holiday"
    expired.access_hours.extend(off_peak())
    for _ in range(2):
        with (
            running_server(
                tmp_path, engine=MemoryEngine(), wall_clock=clock, site_id="a"
            ) as server,
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = pb_grpc.FaceGateServiceStub(channel)
            if server.store.count_members() == 0:
                stub.Enroll(
                    pb.EnrollRequest(member_id="m-r", photos=[face(12)], membership=expired),
                    timeout=10,
                )
                stub.Identify(pb.IdentifyRequest(image=face(12), turnstile_id="g"), timeout=10)
                continue
            got = stub.GetMember(pb.GetMemberRequest(member_id="m-r"), timeout=5).member
            assert got.membership == expired
            [event] = stub.ListAccessEvents(pb.ListAccessEventsRequest(), timeout=5).events
            assert event.membership_rule == pb.MEMBERSHIP_RULE_EXPIRED


def test_store_membership_round_trip() -> None:
    from facegate_server.store.codec import membership_from_json, membership_json

    m = Membership(
        valid_from=at("2026-01-01T00:00"),
        valid_until=None,
        suspended=True,
        suspension_reason="unpaid",
        access_hours=OFF_PEAK,
        sites=("a", "b"),
    )
    assert membership_from_json(membership_json(m)) == m
    assert membership_from_json("{}") == Membership()
    assert membership_from_json(membership_json(replace(m, valid_from=None))).valid_from is None


# -- with the cloud, up and down


def test_the_rules_hold_with_the_cloud_up_and_down(faces: Faces, tmp_path: Path) -> None:
    from tests.cloud import cloud_gate, emulator

    clock = WallClock(at("2026-12-07T09:00"))
    biden = faces.of("joe_biden")
    with emulator() as emu, cloud_gate(emu, tmp_path, wall_clock=clock, site_id="a") as gate:
        yesterday = clock() - timedelta(days=1)
        gate.stub.Enroll(
            pb.EnrollRequest(
                member_id="m-biden",
                photos=[faces.read(biden[0])],
                membership=membership(valid_until=yesterday),
            ),
            timeout=60,
        )
        gate.settle()
        up = gate.identify(faces.read(biden[1]))
        assert (up.decision, up.member_id, up.engine) == (
            pb.DECISION_DENIED_MEMBERSHIP_INACTIVE,
            "m-biden",
            pb.ENGINE_AZURE,
        )
        emu.admin.set_fault("refuse")
        down = gate.identify(faces.read(biden[1]))
        assert (down.decision, down.member_id, down.engine) == (
            pb.DECISION_DENIED_MEMBERSHIP_INACTIVE,
            "m-biden",
            pb.ENGINE_LOCAL,
        )
        assert down.membership_rule == pb.MEMBERSHIP_RULE_EXPIRED and down.hint
        # Extended while the cloud is away: granted at once, by the local copy.
        gate.stub.UpdateMember(
            pb.UpdateMemberRequest(
                member=pb.Member(
                    member_id="m-biden",
                    membership=membership(valid_until=clock() + timedelta(days=30)),
                ),
                update_mask=FieldMask(paths=["membership.valid_until"]),
            ),
            timeout=10,
        )
        granted = gate.identify(faces.read(biden[1]))
        assert (granted.decision, granted.member_id) == (pb.DECISION_GRANTED, "m-biden")
        emu.admin.set_fault("healthy")
        gate.clock.advance(60)  # the breaker's cool-down
        gate.reset_breaker()
        again = gate.identify(faces.read(biden[1]))
        assert (again.decision, again.member_id, again.engine) == (
            pb.DECISION_GRANTED,
            "m-biden",
            pb.ENGINE_AZURE,
        )


def test_a_removed_photo_leaves_the_cloud_person(faces: Faces, tmp_path: Path) -> None:
    from tests.cloud import cloud_gate, emulator

    rose, kit = faces.of("rose_leslie"), faces.of("kit_harington")
    with emulator() as emu, cloud_gate(emu, tmp_path) as gate:
        for member_id, photos in (("m-rose", [rose[0], kit[0]]), ("m-kit", [kit[1]])):
            gate.stub.Enroll(
                pb.EnrollRequest(member_id=member_id, photos=[faces.read(p) for p in photos]),
                timeout=60,
            )
        gate.settle()
        assert {k: len(v) for k, v in gate.persons().items()} == {"m-rose": 2, "m-kit": 1}
        emu.admin.set_fault("refuse")  # removed while the cloud is away
        listed = gate.stub.ListMemberPhotos(
            pb.ListMemberPhotosRequest(member_id="m-rose"), timeout=5
        )
        assert listed.photos[1].quality.size > 0  # measured by the local engine at enrolment
        gate.stub.RemoveMemberPhoto(
            pb.RemoveMemberPhotoRequest(member_id="m-rose", photo_id=listed.photos[1].photo_id),
            timeout=10,
        )
        assert gate.server.store.outbox_depth() == 1
        emu.admin.set_fault("healthy")
        gate.clock.advance(60)
        gate.settle()
        assert {k: len(v) for k, v in gate.persons().items()} == {"m-rose": 1, "m-kit": 1}
        found = gate.identify(faces.read(rose[1]))
        assert (found.decision, found.member_id) == (pb.DECISION_GRANTED, "m-rose")
        other = gate.identify(faces.read(kit[2]))
        assert (other.decision, other.member_id) == (pb.DECISION_GRANTED, "m-kit")


# -- the client library and the CLI, against a real server


def test_hours_are_written_and_read_as_people_do() -> None:
    from facegate_client.membership import format_hours, parse_hours

    windows = parse_hours("Mon-Fri 06:00-16:00; Sat,Sun 08:00-12:00; Fri 22:00-02:00")
    assert [(w.day, w.start_minute, w.end_minute) for w in windows] == [
        *((d, 360, 960) for d in range(1, 6)),
        (6, 480, 720),
        (7, 480, 720),
        (5, 1320, 120),
    ]
    assert format_hours(windows) == "Mon-Fri 06:00-16:00; Sat-Sun 08:00-12:00; Fri 22:00-02:00"
    assert format_hours(parse_hours("Sat-Mon 00:00-24:00")) == "Mon,Sat-Sun 00:00-24:00"
    assert parse_hours("") == [] and format_hours([]) == "any time"
    for bad in ("Mon 06:00", "Funday 06:00-07:00", "Mon 25:00-26:00", "Mon 06:00-06:00"):
        with pytest.raises(ValueError):
            parse_hours(bad)


def test_the_client_and_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from facegate_client import KEEP, FaceGateClient, FailedPrecondition, cli

    monkeypatch.delenv("FACEGATE_TOKEN", raising=False)
    clock = WallClock(at("2026-12-07T17:00"))  # Mon 18:00 in Berlin
    photo_a, photo_b = tmp_path / "a.png", tmp_path / "b.png"
    photo_a.write_bytes(face(20))
    photo_b.write_bytes(face(21))
    with running_server(
        tmp_path / "data",
        engine=MemoryEngine(),
        wall_clock=clock,
        site_id="a",
        site_time_zone="Europe/Berlin",
        keep_photos=True,
    ) as server:
        t = ("--target", f"127.0.0.1:{server.port}")

        def run(*argv: str) -> tuple[int, str, str]:
            code = cli.main([*argv, *t])
            out, err = capsys.readouterr()
            return code, out, err

        membership = ("--hours", "Mon-Fri 06:00-16:00", "--sites", "a,b")
        until = ("--valid-until", "2027-01-01T00:00:00+01:00")
        photos = (str(photo_a), str(photo_b))
        code, out, err = run("enroll", "--member-id", "m-1", *membership, *until, *photos)
        assert (code, err) == (0, ""), err
        code, out, _ = run("members", "get", "m-1")
        assert out.splitlines()[1:] == [
            "  valid: from - until 2026-12-31T23:00:00Z",
            "  hours: Mon-Fri 06:00-16:00 (site time)",
            "  sites: a, b",
        ]
        code, out, _ = run("identify", str(photo_a))
        assert out.startswith("DENIED_OUTSIDE_HOURS m-1 ")
        code, out, _ = run("members", "update", "m-1", "--hours", "", "--suspend", "unpaid")
        assert code == 0 and "  suspended: unpaid" in out and "  hours: any time (site time)" in out
        assert "  sites: a, b" in out  # not named: unchanged
        assert run("identify", str(photo_a))[1].startswith("DENIED_MEMBERSHIP_INACTIVE m-1 ")
        code, _, err = run("members", "update", "m-1")
        assert code == 2 and "nothing to change" in err
        code, out, _ = run("members", "update", "m-1", "--resume", "--valid-until", "none")
        assert "suspended" not in out and "until -" in out
        assert run("identify", str(photo_a))[1].startswith("GRANTED m-1 ")

        code, out, _ = run("events", "--decision", "DENIED_OUTSIDE_HOURS")
        assert code == 0 and len(out.splitlines()) == 1 and out.rstrip().endswith("OUTSIDE_HOURS")
        code, out, _ = run("events", "--rule", "suspended")
        assert len(out.splitlines()) == 1 and "DENIED_MEMBERSHIP_INACTIVE  m-1" in out
        code, _, err = run("events", "--rule", "NOPE")
        assert code == 2 and "EXPIRED" in err

        code, out, _ = run("members", "photos", "m-1", "--save", str(tmp_path))
        first, second = (int(line.split()[0]) for line in out.splitlines())
        assert (tmp_path / f"m-1-{first}.png").read_bytes() == face(20)
        code, out, _ = run("members", "remove-photo", "m-1", str(first))
        assert (code, out.split("  ")[2]) == (0, "1 face")
        assert run("identify", str(photo_a))[1].startswith("DENIED_UNKNOWN_FACE")
        code, _, err = run("members", "remove-photo", "m-1", str(second))
        assert code == 1 and "FAILED_PRECONDITION" in err and "LAST_PHOTO" in err

        with FaceGateClient(f"127.0.0.1:{server.port}") as client:
            member = client.update_member("m-1", display_name="Kim Jiwoo", sites=[])
            assert (member.display_name, list(member.membership.sites)) == ("Kim Jiwoo", [])
            with pytest.raises(ValueError):
                client.update_member("m-1", display_name=KEEP)
            with pytest.raises(FailedPrecondition):
                client.remove_member_photo("m-1", second)
            [photo] = client.list_member_photos("m-1")
            assert photo.photo_id == second and not photo.photo
            events = list(
                client.iter_access_events(
                    decisions=[pb.DECISION_GRANTED, pb.DECISION_DENIED_UNKNOWN_FACE]
                )
            )
            assert [pb.Decision.Name(e.decision) for e in events] == [
                "DECISION_DENIED_UNKNOWN_FACE",
                "DECISION_GRANTED",
            ]


def test_verify_applies_the_rules_too(door: Door) -> None:
    """A card and the right face: the membership still decides."""
    door.enroll("m-v", face(30), membership=membership(valid_until=door.clock() - timedelta(1)))
    ask = pb.VerifyRequest(member_id="m-v", image=face(30), turnstile_id="gate-1")
    answer = door.stub.Verify(ask, timeout=10)
    assert (answer.decision, answer.member_id, answer.membership_rule) == (
        pb.DECISION_DENIED_MEMBERSHIP_INACTIVE,
        "m-v",
        pb.MEMBERSHIP_RULE_EXPIRED,
    )
    assert answer.hint and answer.display_name == ""
    [event] = door.stub.ListAccessEvents(
        pb.ListAccessEventsRequest(membership_rule=pb.MEMBERSHIP_RULE_EXPIRED), timeout=5
    ).events
    assert (event.event_id, event.kind, event.claimed_member_id) == (
        answer.event_id,
        pb.ACCESS_KIND_VERIFY,
        "m-v",
    )
    door.update(pb.Member(member_id="m-v"), "membership.valid_until")
    assert door.stub.Verify(ask, timeout=10).decision == pb.DECISION_GRANTED
    # A face that is not the claimed member's is decided as such, whatever their membership.
    door.update(pb.Member(member_id="m-v", membership=pb.Membership(suspended=True)), "membership")
    stranger = pb.VerifyRequest(member_id="m-v", image=face(31), turnstile_id="gate-1")
    other = door.stub.Verify(stranger, timeout=10)
    assert (other.decision, other.member_id, other.membership_rule) == (
        pb.DECISION_DENIED_NOT_THIS_MEMBER,
        "",
        pb.MEMBERSHIP_RULE_UNSPECIFIED,
    )
