"""The store contract: every Store implementation must pass every test here."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psycopg
import pytest
from facegate_server.domain import (
    CloudPerson,
    Decision,
    EngineKind,
    EventFilter,
    FaceTemplate,
    NewAccessEvent,
)
from facegate_server.errors import MemberAlreadyExists, MemberNotFound
from facegate_server.store import MemoryStore, SqliteStore, Store
from facegate_server.store.postgres import PostgresStore
from facegate_server.store.sqlite import SCHEMA_VERSION

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def template(seed: int, photo: bytes | None = None) -> FaceTemplate:
    return FaceTemplate(np.random.default_rng(seed).normal(size=128), photo)


# The shared store's tables, emptied between tests (the schema and identity stay).
PG_TABLES = "members, faces, access_events, cloud_persons, outbox, member_changes"


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SqliteStore(tmp_path / "db")
    else:
        made = PostgresStore(request.getfixturevalue("postgres_url"))
        with psycopg.connect(made.url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {PG_TABLES} RESTART IDENTITY CASCADE")
    yield made
    made.close()


def event(t: datetime, member: str = "m-1", turnstile: str = "gate-1") -> NewAccessEvent:
    return NewAccessEvent(
        time=t,
        turnstile_id=turnstile,
        member_id=member,
        decision=Decision.GRANTED if member else Decision.DENIED_UNKNOWN_FACE,
        engine=EngineKind.LOCAL,
        confidence=0.9,
        latency=timedelta(milliseconds=150),
    )


def test_create_and_get(store: Store) -> None:
    created = store.create_member("m-1", "Kim Jiwoo", [template(1), template(2)], T0)
    assert created.member_id == "m-1"
    assert created.face_count == 2
    assert created.create_time == created.update_time == T0
    assert store.get_member("m-1") == created


def test_create_existing_is_refused_and_changes_nothing(store: Store) -> None:
    store.create_member("m-1", "Kim", [template(1)], T0)
    with pytest.raises(MemberAlreadyExists):
        store.create_member("m-1", "Other", [template(2), template(3)], T0 + timedelta(1))
    assert store.get_member("m-1").display_name == "Kim"
    assert len(list(store.iter_embeddings())) == 1


def test_unknown_member(store: Store) -> None:
    with pytest.raises(MemberNotFound):
        store.get_member("nobody")
    with pytest.raises(MemberNotFound):
        store.delete_member("nobody")
    with pytest.raises(MemberNotFound):
        store.add_templates("nobody", [template(1)], T0)
    assert list(store.iter_embeddings()) == []


def test_add_templates(store: Store) -> None:
    store.create_member("m-1", "Kim", [template(1)], T0)
    later = T0 + timedelta(days=3)
    member = store.add_templates("m-1", [template(2), template(3)], later)
    assert member.face_count == 3
    assert member.create_time == T0
    assert member.update_time == later


def test_embeddings_round_trip_exactly(store: Store) -> None:
    t1, t2, t3 = template(1), template(2), template(3)
    store.create_member("a", "", [t1, t2], T0)
    store.create_member("b", "", [t3], T0)
    got = list(store.iter_embeddings())
    assert [m for m, _ in got] == ["a", "a", "b"]
    for (_, e), t in zip(got, [t1, t2, t3], strict=True):
        assert np.array_equal(e, t.embedding)


def test_list_members_pages_in_id_order(store: Store) -> None:
    for member_id in ["m-3", "m-1", "m-2", "m-5", "m-4"]:
        store.create_member(member_id, "", [template(1)], T0)
    assert [m.member_id for m in store.list_members(2)] == ["m-1", "m-2"]
    assert [m.member_id for m in store.list_members(2, after="m-2")] == ["m-3", "m-4"]
    assert [m.member_id for m in store.list_members(2, after="m-4")] == ["m-5"]
    assert store.list_members(2, after="m-5") == []


def test_delete_removes_templates_and_keeps_events(store: Store) -> None:
    store.create_member("m-1", "Kim", [template(1, b"photo")], T0)
    store.create_member("m-2", "Lee", [template(2)], T0)
    store.record_event(event(T0, "m-1"))
    store.delete_member("m-1")
    with pytest.raises(MemberNotFound):
        store.get_member("m-1")
    assert [m for m, _ in store.iter_embeddings()] == ["m-2"]
    assert [e.member_id for e in store.list_events(EventFilter(), 10)] == ["m-1"]
    # Deleted ids can be enrolled again, from scratch.
    assert store.create_member("m-1", "Kim", [template(3)], T0).face_count == 1


def test_events_newest_first_filtered_and_paged(store: Store) -> None:
    for i in range(6):
        store.record_event(event(T0 + timedelta(minutes=i), "m-1" if i % 2 else "m-2"))
    store.record_event(event(T0 + timedelta(minutes=9), "", turnstile="gate-2"))
    everything = store.list_events(EventFilter(), 100)
    assert [e.event_id for e in everything] == sorted(
        (e.event_id for e in everything), reverse=True
    )
    assert everything[0].turnstile_id == "gate-2"
    assert everything[0].decision is Decision.DENIED_UNKNOWN_FACE
    assert everything[-1].latency == timedelta(milliseconds=150)
    assert everything[-1].time == T0

    m1 = store.list_events(EventFilter(member_id="m-1"), 2)
    assert [e.time.minute for e in m1] == [5, 3]
    rest = store.list_events(EventFilter(member_id="m-1"), 2, before_id=m1[-1].event_id)
    assert [e.time.minute for e in rest] == [1]

    window = EventFilter(start_time=T0 + timedelta(minutes=2), end_time=T0 + timedelta(minutes=4))
    assert [e.time.minute for e in store.list_events(window, 100)] == [3, 2]
    assert [e.member_id for e in store.list_events(EventFilter(turnstile_id="gate-2"), 9)] == [""]


def test_events_after_an_id_oldest_first_filtered_and_paged(store: Store) -> None:
    ids = [
        store.record_event(event(T0 + timedelta(minutes=i), "m-1" if i % 2 else "m-2")).event_id
        for i in range(6)
    ]
    assert ids == sorted(ids)
    everything = store.events_after(0, EventFilter(), 100)
    assert [e.event_id for e in everything] == ids
    assert everything == store.list_events(EventFilter(), 100)[::-1]

    # Paged: each page resumes after the last id of the one before, nothing lost or repeated.
    seen, last = [], 0
    while page := store.events_after(last, EventFilter(), 4):
        seen += [e.event_id for e in page]
        last = page[-1].event_id
    assert seen == ids
    assert store.events_after(ids[-1], EventFilter(), 10) == []

    m1 = store.events_after(ids[1], EventFilter(member_id="m-1"), 10)
    assert [e.event_id for e in m1] == [ids[3], ids[5]]
    assert [e.event_id for e in store.events_after(0, EventFilter(member_id="m-2"), 2)] == [
        ids[0],
        ids[2],
    ]
    # A new event comes after everything read so far.
    new = store.record_event(event(T0 + timedelta(minutes=9), "", turnstile="gate-2"))
    assert new.event_id > ids[-1]
    assert store.events_after(last, EventFilter(), 10) == [new]
    assert store.events_after(0, EventFilter(turnstile_id="gate-2"), 10) == [new]
    assert store.events_after(0, EventFilter(decisions=(Decision.DENIED_UNKNOWN_FACE,)), 10) == [
        new
    ]


def test_sqlite_events_after_survives_reopen(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "db")
    before = first.record_event(event(T0))
    first.close()
    again = SqliteStore(tmp_path / "db")
    after = again.record_event(event(T0 + timedelta(minutes=1)))
    assert after.event_id > before.event_id
    assert [e.event_id for e in again.events_after(before.event_id, EventFilter(), 10)] == [
        after.event_id
    ]
    again.close()


def test_sqlite_survives_reopen_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "facegate.sqlite3"
    store = SqliteStore(path)
    store.create_member("m-1", "Kim", [template(1)], T0)
    store.record_event(event(T0))
    store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = SqliteStore(path)
    assert again.get_member("m-1").display_name == "Kim"
    assert again.schema_version() == SCHEMA_VERSION
    assert len(again.list_events(EventFilter(), 10)) == 1
    again.close()


def test_sqlite_enrolment_is_all_or_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    # The second template cannot be stored (SQLite cannot bind the photo), as if the
    # process failed half way through writing the member's faces.
    broken = FaceTemplate(np.zeros(128), photo=object())  # type: ignore[arg-type]
    store.create_member("m-0", "", [template(0)], T0)
    with pytest.raises(sqlite3.Error):
        store.create_member("m-1", "Kim", [template(1), broken, template(2)], T0)
    with pytest.raises(MemberNotFound):
        store.get_member("m-1")
    assert [m for m, _ in store.iter_embeddings()] == ["m-0"]
    store.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        SqliteStore(path)


def cloud_template(seed: int) -> FaceTemplate:
    return FaceTemplate(np.random.default_rng(seed).normal(size=128), cloud_photo=b"jpeg%d" % seed)


def test_enrolment_fills_the_outbox_in_order(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1), cloud_template(2)], T0)
    store.create_member("m-2", "", [template(3)], T0)  # no cloud photo: nothing to send
    store.add_templates("m-1", [cloud_template(4)], T0)
    entries = store.outbox(10)
    assert [(e.kind, e.member_id, e.photo) for e in entries] == [
        ("add_face", "m-1", b"jpeg1"),
        ("add_face", "m-1", b"jpeg2"),
        ("add_face", "m-1", b"jpeg4"),
    ]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    face_ids = [f.face_id for f in store.faces("m-1")]
    assert [e.face_id for e in entries] == face_ids
    assert store.outbox_depth() == 3
    assert store.outbox(1) == entries[:1]


def test_outbox_attempts_errors_and_done(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1)], T0)
    [entry] = store.outbox(10)
    store.outbox_attempt(entry.seq)
    store.outbox_attempt(entry.seq, error="503 from the cloud")
    [again] = store.outbox(10)
    assert (again.attempts, again.last_error) == (1, "503 from the cloud")
    store.outbox_done(entry.seq)
    assert store.outbox(10) == [] and store.outbox_depth() == 0


def test_a_parked_entry_steps_aside_until_it_is_retried(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1), cloud_template(2)], T0)
    store.create_member("m-2", "", [cloud_template(3)], T0)
    first, second, third = store.outbox(10)
    store.outbox_attempt(first.seq)
    store.outbox_park(first.seq, "HTTP 400 InvalidImage: decoding error")
    assert store.outbox(10) == [second, third] and store.outbox_depth() == 2
    [parked] = store.outbox_parked(10)
    assert (parked.seq, parked.member_id, parked.face_id) == (first.seq, "m-1", first.face_id)
    assert parked.parked == "HTTP 400 InvalidImage: decoding error"
    assert parked.photo is None  # listing what is parked reads no photo
    assert store.outbox_parked_count() == 1
    assert store.outbox_members() == {"m-1", "m-2"}
    of_m1 = store.outbox_of("m-1")
    assert [(e.seq, e.parked != "", e.photo) for e in of_m1] == [
        (first.seq, True, None),
        (second.seq, False, None),
    ]
    assert store.outbox_unpark() == 1
    again = store.outbox(10)
    assert [e.seq for e in again] == [first.seq, second.seq, third.seq]
    assert (again[0].parked, again[0].attempts, again[0].photo) == ("", 0, first.photo)
    assert store.outbox_parked_count() == 0


def test_deleting_a_member_drops_its_parked_photos(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1)], T0)
    [entry] = store.outbox(10)
    store.outbox_park(entry.seq, "refused")
    store.delete_member("m-1", cloud=True)
    assert store.outbox_parked_count() == 0
    assert [e.kind for e in store.outbox(10)] == ["delete_member"]


def test_the_store_identity_is_made_once(store: Store) -> None:
    identity = store.store_id()
    assert len(identity) >= 16 and identity == store.store_id()


def test_sqlite_keeps_its_identity_and_two_stores_differ(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "a" / "db.sqlite3")
    identity = first.store_id()
    first.close()
    again = SqliteStore(tmp_path / "a" / "db.sqlite3")
    other = SqliteStore(tmp_path / "b" / "db.sqlite3")
    try:
        assert again.store_id() == identity and other.store_id() != identity
    finally:
        again.close()
        other.close()


def test_faces_can_be_read_without_their_photos(store: Store) -> None:
    store.create_member("m-1", "", [template(1, photo=b"kept"), template(2)], T0)
    kept, bare = store.faces("m-1", photos=False)
    assert (kept.photo, kept.photo_kept, bare.photo, bare.photo_kept) == (None, True, None, False)
    assert store.face_photo(kept.face_id) == b"kept" and store.face_photo(bare.face_id) is None
    assert store.faces("m-1")[0].photo == b"kept"


def test_failed_enrolment_leaves_no_outbox_entry(store: Store) -> None:
    store.create_member("m-1", "", [template(1)], T0)
    with pytest.raises(MemberAlreadyExists):
        store.create_member("m-1", "", [cloud_template(2)], T0)
    assert store.outbox_depth() == 0


def test_delete_drops_pending_photos_and_queues_the_cloud_delete(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1)], T0)
    store.create_member("m-2", "", [cloud_template(2)], T0)
    store.save_cloud_person("m-1", "p-1")
    store.delete_member("m-1", cloud=True)
    assert [(e.kind, e.member_id, e.photo) for e in store.outbox(10)] == [
        ("add_face", "m-2", b"jpeg2"),
        ("delete_member", "m-1", None),
    ]
    # The person is remembered (to delete it) but no longer maps to a member.
    assert store.member_of_person("p-1") is None
    assert store.cloud_person("m-1") is None
    assert [(p.person_id, p.deleted) for p in store.cloud_people()] == [("p-1", True)]
    # Re-enrolled under the same id: a new person, the old one still to be deleted.
    store.create_member("m-1", "", [cloud_template(3)], T0)
    store.save_cloud_person("m-1", "p-9")
    assert store.member_of_person("p-9") == "m-1"
    assert store.member_of_person("p-1") is None
    store.forget_cloud_person("p-1")
    assert [p.person_id for p in store.cloud_people()] == ["p-9"]


def test_cloud_readiness_follows_training(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1)], T0)
    store.create_member("m-2", "", [cloud_template(2)], T0)
    store.save_cloud_person("m-1", "p-1")
    person = store.cloud_person("m-1")
    assert person is not None and not person.ready
    [face] = store.faces("m-1")
    store.save_cloud_face(face.face_id, "pf-1")
    assert store.faces("m-1")[0].persisted_face_id == "pf-1"
    store.training_queued()
    # A person whose faces arrive after the training was queued is not covered by it.
    store.save_cloud_person("m-2", "p-2")
    store.save_cloud_face(store.faces("m-2")[0].face_id, "pf-2")
    store.training_succeeded()
    ready = {p.member_id: p.ready for p in store.cloud_people()}
    assert ready == {"m-1": True, "m-2": False}
    assert store.member_of_person("p-1") == "m-1"
    store.training_queued()
    store.training_succeeded()
    assert all(p.ready for p in store.cloud_people())


def test_the_cloud_people_version_moves_with_every_change_to_them(store: Store) -> None:
    """Servers that do not replay the outbox follow the holder's persons by this version: it
    moves with every write to them (in the write's transaction), and with nothing else; a
    store without one (None) is always read whole."""
    store.create_member("m-1", "", [cloud_template(1)], T0)
    store.create_member("m-2", "", [cloud_template(2)], T0)
    seen = [store.cloud_people_version()]
    if seen[0] is None:
        store.save_cloud_person("m-1", "p-1")
        assert store.cloud_people_version() is None
        return
    for change in (
        lambda: store.save_cloud_person("m-1", "p-1"),
        store.training_queued,
        store.training_succeeded,
        lambda: store.delete_member("m-1", cloud=True),
        lambda: store.forget_cloud_person("p-1"),
    ):
        change()
        seen.append(store.cloud_people_version())
    assert seen == sorted(set(seen)), seen  # each change moved it forward
    store.cloud_people()
    store.get_member("m-2")
    store.create_member("m-3", "", [cloud_template(3)], T0)  # no person: not a change
    assert store.cloud_people_version() == seen[-1]


def test_followers_of_the_cloud_people_read_them_only_when_they_changed(store: Store) -> None:
    """CloudPeople.follow (a server that does not hold the replay lease, every tick): the
    holder's changes are seen at the next follow; nothing changed, nothing is read."""
    from facegate_server.cloud.engine import CloudPeople

    reads = 0
    read_all = store.cloud_people

    def counted() -> list[CloudPerson]:
        nonlocal reads
        reads += 1
        return read_all()

    store.cloud_people = counted  # type: ignore[method-assign]
    store.create_member("m-1", "", [cloud_template(1)], T0)
    follower = CloudPeople(store)
    store.save_cloud_person("m-1", "p-1")  # the holder, through the shared store
    store.save_cloud_face(store.faces("m-1")[0].face_id, "pf-1")
    follower.follow()
    person = follower.person_of("m-1")
    assert person is not None and person.person_id == "p-1" and not person.ready
    store.training_queued()
    store.training_succeeded()
    follower.follow()
    assert follower.ready("m-1")
    before = reads
    for _ in range(3):
        follower.follow()
    assert reads == before + (0 if store.cloud_people_version() is not None else 3)
    store.delete_member("m-1", cloud=True)
    follower.follow()
    assert follower.person_of("m-1") is None and follower.member_of("p-1") is None


def test_reports_are_kept_with_events(store: Store) -> None:
    from dataclasses import replace

    from facegate_server.domain import EngineOutcome, EngineReport

    reports = (
        EngineReport(
            EngineKind.LOCAL,
            EngineOutcome.DECIDED,
            Decision.GRANTED,
            "m-1",
            0.8,
            latency=timedelta(milliseconds=150),
        ),
        EngineReport(EngineKind.AZURE, EngineOutcome.TIMED_OUT, detail="no answer in 1100 ms"),
    )
    store.record_event(replace(event(T0), reports=reports))
    [stored] = store.list_events(EventFilter(), 10)
    assert stored.reports == reports


def test_membership_is_created_updated_and_kept(store: Store) -> None:
    from facegate_server.domain import AccessWindow, Membership

    rules = Membership(
        valid_from=T0,
        valid_until=T0 + timedelta(days=30),
        access_hours=(AccessWindow(0, 360, 960), AccessWindow(4, 22 * 60, 120)),
        sites=("a",),
    )
    assert store.create_member("m-1", "Kim", [template(1)], T0, rules).membership == rules
    assert store.create_member("m-2", "Lee", [template(2)], T0).membership == Membership()
    later = T0 + timedelta(days=1)
    suspended = Membership(suspended=True, suspension_reason="unpaid")
    updated = store.update_member("m-1", "Kim Jiwoo", suspended, later)
    assert (updated.display_name, updated.membership, updated.update_time) == (
        "Kim Jiwoo",
        suspended,
        later,
    )
    assert updated.create_time == T0 and updated.face_count == 1
    assert store.get_member("m-1") == updated
    assert store.list_members(10)[0] == updated
    assert store.get_member("m-2").membership == Membership()
    with pytest.raises(MemberNotFound):
        store.update_member("nobody", "", Membership(), later)


def test_photos_are_listed_and_removed_one_at_a_time(store: Store) -> None:
    from facegate_server.domain import FaceQuality
    from facegate_server.errors import LastPhoto, PhotoNotFound

    quality = FaceQuality(size=200, sharpness=80.5, brightness=120.0, yaw=0.05, pitch=0.75)
    t1 = FaceTemplate(template(1).embedding, b"one", quality=quality)
    store.create_member("m-1", "", [t1, template(2, b"two"), template(3)], T0)
    store.create_member("m-2", "", [template(4)], T0)
    photos = store.photos("m-1", with_bytes=True)
    assert [p.photo for p in photos] == [b"one", b"two", None]
    assert photos[0].quality == quality and photos[1].quality is None
    assert all(p.create_time == T0 for p in photos)
    assert [p.photo for p in store.photos("m-1")] == [None, None, None]
    [other] = store.photos("m-2")

    later = T0 + timedelta(hours=1)
    member, removed = store.remove_photo("m-1", photos[0].photo_id, later)
    assert (member.face_count, member.update_time) == (2, later)
    assert np.array_equal(removed.embedding, t1.embedding)  # for the engines to forget
    assert [p.photo_id for p in store.photos("m-1")] == [p.photo_id for p in photos[1:]]
    assert [m for m, _ in store.iter_embeddings()] == ["m-1", "m-1", "m-2"]
    with pytest.raises(PhotoNotFound):
        store.remove_photo("m-1", photos[0].photo_id, later)  # gone already
    with pytest.raises(PhotoNotFound):
        store.remove_photo("m-1", other.photo_id, later)  # another member's
    with pytest.raises(MemberNotFound):
        store.remove_photo("nobody", other.photo_id, later)
    with pytest.raises(MemberNotFound):
        store.photos("nobody")
    store.remove_photo("m-1", photos[1].photo_id, later)
    with pytest.raises(LastPhoto):
        store.remove_photo("m-1", photos[2].photo_id, later)
    assert store.get_member("m-1").face_count == 1
    assert store.get_member("m-2").face_count == 1


def test_a_removed_photo_leaves_the_cloud_through_the_outbox(store: Store) -> None:
    store.create_member("m-1", "", [cloud_template(1), cloud_template(2), cloud_template(3)], T0)
    store.save_cloud_person("m-1", "p-1")
    sent, tried, waiting = store.faces("m-1")
    store.save_cloud_face(sent.face_id, "pf-1")
    entries = {e.face_id: e for e in store.outbox(10)}
    store.outbox_done(entries[sent.face_id].seq)
    store.outbox_attempt(entries[tried.face_id].seq)  # sent, but never heard back from

    store.remove_photo("m-1", waiting.face_id, T0, cloud=True)  # never sent: just dropped
    assert [e.face_id for e in store.outbox(10)] == [tried.face_id]
    store.remove_photo("m-1", tried.face_id, T0, cloud=True)  # may be there: found by tag
    store.create_member("m-2", "", [cloud_template(4)], T0)
    assert [(e.kind, e.face_id, e.persisted_face_id) for e in store.outbox(10)] == [
        ("delete_face", tried.face_id, None),
        ("add_face", store.faces("m-2")[0].face_id, None),
    ]
    store.add_templates("m-1", [template(5)], T0)
    store.remove_photo("m-1", sent.face_id, T0, cloud=True)  # in the cloud: by its id
    assert [(e.kind, e.face_id, e.persisted_face_id) for e in store.outbox(10)][-1] == (
        "delete_face",
        sent.face_id,
        "pf-1",
    )


def test_events_filter_by_decision_and_rule(store: Store) -> None:
    from dataclasses import replace

    from facegate_server.domain import MembershipRule

    store.record_event(event(T0))
    expired = replace(
        event(T0), decision=Decision.DENIED_MEMBERSHIP_INACTIVE, rule=MembershipRule.EXPIRED
    )
    suspended = replace(expired, rule=MembershipRule.SUSPENDED)
    hours = replace(
        event(T0), decision=Decision.DENIED_OUTSIDE_HOURS, rule=MembershipRule.OUTSIDE_HOURS
    )
    ids = [store.record_event(e).event_id for e in (expired, suspended, hours)]
    store.record_event(event(T0, ""))
    inactive = EventFilter(decisions=(Decision.DENIED_MEMBERSHIP_INACTIVE,))
    assert [e.event_id for e in store.list_events(inactive, 10)] == [ids[1], ids[0]]
    assert [e.rule for e in store.list_events(inactive, 10)] == [
        MembershipRule.SUSPENDED,
        MembershipRule.EXPIRED,
    ]
    two = EventFilter(
        decisions=(Decision.DENIED_MEMBERSHIP_INACTIVE, Decision.DENIED_OUTSIDE_HOURS)
    )
    assert [e.event_id for e in store.list_events(two, 10)] == ids[::-1]
    only_expired = EventFilter(rule=MembershipRule.EXPIRED)
    assert [e.event_id for e in store.list_events(only_expired, 10)] == [ids[0]]
    assert store.list_events(EventFilter(), 10)[-1].rule is None


def test_sqlite_upgrades_a_version_2_file_keeping_everything(tmp_path: Path) -> None:
    from facegate_server.domain import Membership
    from facegate_server.store.sqlite import MIGRATIONS

    path = tmp_path / "v2.sqlite3"
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        for statement in migration:
            db.execute(statement)
    db.execute("INSERT INTO members VALUES ('m-1', 'Kim', 0, 0)")
    blob = np.zeros(128, "<f8").tobytes()
    db.execute("INSERT INTO faces (member_id, embedding, create_us) VALUES ('m-1', ?, 0)", (blob,))
    db.execute(
        "INSERT INTO outbox (kind, member_id, face_id, photo) VALUES ('add_face', 'm-1', 1, x'00')"
    )
    db.execute(
        "INSERT INTO access_events (time_us, turnstile_id, member_id, decision, engine,"
        " confidence, latency_us) VALUES (0, 'g', 'm-1', 'GRANTED', 'LOCAL', 0.9, 5)"
    )
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    store = SqliteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get_member("m-1").membership == Membership()
    assert store.photos("m-1")[0].quality is None
    [entry] = store.outbox(10)
    assert (entry.kind, entry.face_id, entry.photo, entry.persisted_face_id) == (
        "add_face",
        1,
        b"\x00",
        None,
    )
    assert store.list_events(EventFilter(), 10)[0].rule is None
    store.create_member("m-2", "", [cloud_template(2)], T0)  # the outbox still numbers on
    assert [e.seq for e in store.outbox(10)] == sorted(e.seq for e in store.outbox(10))


def test_a_verification_is_kept_as_one(store: Store) -> None:
    from dataclasses import replace

    from facegate_server.domain import AccessKind

    store.record_event(event(T0))
    verified = replace(
        event(T0, ""),
        decision=Decision.DENIED_NOT_THIS_MEMBER,
        kind=AccessKind.VERIFY,
        claimed_member_id="m-9",
        detail="no member with this id",
    )
    store.record_event(verified)
    newest, oldest = store.list_events(EventFilter(), 10)
    assert (newest.kind, newest.claimed_member_id, newest.detail) == (
        AccessKind.VERIFY,
        "m-9",
        "no member with this id",
    )
    assert newest.decision is Decision.DENIED_NOT_THIS_MEMBER
    assert (oldest.kind, oldest.claimed_member_id, oldest.detail) == (AccessKind.IDENTIFY, "", "")


def test_a_members_events_include_the_verifications_that_claimed_them(store: Store) -> None:
    from dataclasses import replace

    from facegate_server.domain import AccessKind

    granted = store.record_event(
        replace(event(T0), kind=AccessKind.VERIFY, claimed_member_id="m-1")
    )
    misused = store.record_event(
        replace(
            event(T0, ""),
            decision=Decision.DENIED_NOT_THIS_MEMBER,
            kind=AccessKind.VERIFY,
            claimed_member_id="m-1",
        )
    )
    store.record_event(event(T0, "m-2"))
    store.record_event(replace(event(T0, ""), kind=AccessKind.VERIFY, claimed_member_id="m-2"))
    identified = store.record_event(event(T0))
    m1 = store.list_events(EventFilter(member_id="m-1"), 10)
    assert [e.event_id for e in m1] == [identified.event_id, misused.event_id, granted.event_id]
    assert [
        e.event_id for e in store.list_events(EventFilter(member_id="m-1"), 1, m1[0].event_id)
    ] == [misused.event_id]


def test_sqlite_upgrades_older_events_as_identifications(tmp_path: Path) -> None:
    from facegate_server.domain import AccessKind
    from facegate_server.store.sqlite import MIGRATIONS

    path = tmp_path / "db"
    db = sqlite3.connect(path)
    for number, statements in enumerate(MIGRATIONS[:2]):  # the schema before Verify
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {number + 1}")
    db.execute(
        "INSERT INTO access_events (time_us, turnstile_id, member_id, decision, engine,"
        " confidence, latency_us) VALUES (1, 'gate-1', 'm-1', 'GRANTED', 'LOCAL', 0.9, 150)"
    )
    db.commit()
    db.close()
    store = SqliteStore(path)
    [old] = store.list_events(EventFilter(), 10)
    assert (old.kind, old.claimed_member_id, old.detail, old.member_id) == (
        AccessKind.IDENTIFY,
        "",
        "",
        "m-1",
    )
    assert store.schema_version() == SCHEMA_VERSION
    store.close()


def test_events_before_a_cutoff_are_deleted_and_ids_never_reused(store: Store) -> None:
    assert store.oldest_event_at() is None
    assert store.delete_events_before(T0) == 0
    times = [T0 + timedelta(days=d, microseconds=5) for d in (0, 1, 2, 3)]
    ids = [store.record_event(event(t)).event_id for t in times]
    assert store.oldest_event_at() == times[0]
    # Strictly older than the cutoff: an event at the cutoff itself is kept.
    assert store.delete_events_before(times[2]) == 2
    assert store.oldest_event_at() == times[2]
    kept = store.list_events(EventFilter(), 10)
    assert [e.event_id for e in kept] == ids[:1:-1]
    assert store.delete_events_before(times[2]) == 0
    later = store.record_event(event(T0 + timedelta(days=4)))
    assert later.event_id > ids[-1]
    assert store.delete_events_before(T0 + timedelta(days=30)) == 3
    assert store.oldest_event_at() is None
    assert store.list_events(EventFilter(), 10) == []


def test_sqlite_deletes_many_events_in_batches(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db")
    try:
        count = SqliteStore.EVENT_BATCH * 2 + 7
        for i in range(count):
            store.record_event(event(T0 + timedelta(seconds=i)))
        store.record_event(event(T0 + timedelta(days=1)))
        assert store.delete_events_before(T0 + timedelta(hours=12)) == count
        assert store.oldest_event_at() == T0 + timedelta(days=1)
    finally:
        store.close()
