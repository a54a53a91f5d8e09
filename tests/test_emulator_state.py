"""The emulator's model of a Face resource, without HTTP or dlib: training, expiry, limits,
saving; and the latency and flap draws."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
from facegate_azure_emulator import FaultMode, FaultSettings, LatencyProfile, Limits, ManualClock
from facegate_azure_emulator.errors import FaceApiError
from facegate_azure_emulator.faults import FaultPicker
from facegate_azure_emulator.recognizer import confidence
from facegate_azure_emulator.state import FaceState, GroupKind, iso

LARGE = GroupKind.LARGE_PERSON_GROUP
SMALL = GroupKind.PERSON_GROUP


def vector(seed: int) -> np.ndarray:
    """A unit-length fake embedding; different seeds are far apart (distance ~1.4)."""
    v = np.random.default_rng(seed).normal(size=128)
    return v / np.linalg.norm(v)


def near(v: np.ndarray, by: float) -> np.ndarray:
    """An embedding at distance `by` from v."""
    step = np.zeros(128)
    step[0] = by
    return v + step


def error_of(call: object, *args: object, **kwargs: object) -> FaceApiError:
    with pytest.raises(FaceApiError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def state(clock: ManualClock) -> FaceState:
    return FaceState(clock=clock, training_seconds=3, training_queue_seconds=2)


def enrol(state: FaceState, kind: GroupKind, group: str, *seeds: int) -> list[str]:
    state.create_group(kind, group, name=group, user_data=None, recognition_model="recognition_04")
    ids = []
    for seed in seeds:
        person = state.create_person(kind, group, name=f"p{seed}", user_data=None)
        state.add_face(kind, group, person.person_id, vector(seed), user_data=None)
        ids.append(person.person_id)
    return ids


def probe(state: FaceState, embedding: np.ndarray, model: str = "recognition_04") -> object:
    face_id = state.remember(embedding, recognition_model=model, ttl=86400)
    face = state.detected(face_id)
    assert face is not None
    return face


def identify(state: FaceState, group: str, embedding: np.ndarray, **kw: object) -> list[object]:
    args = {"max_candidates": 1, "threshold": 0.5} | kw
    result = state.identify(LARGE, group, [probe(state, embedding)], **args)  # type: ignore[list-item, arg-type]
    return result[0]["candidates"]  # type: ignore[no-any-return]


def test_training_goes_nonstarted_running_succeeded_with_its_dates(
    state: FaceState, clock: ManualClock
) -> None:
    created = clock()
    enrol(state, LARGE, "gym", 1)
    assert error_of(state.training_status, LARGE, "gym").code == "LargePersonGroupNotTrained"
    assert error_of(state.training_status, LARGE, "gym").status == 404
    clock.advance(10)
    state.train(LARGE, "gym")
    queued = clock()
    assert state.training_status(LARGE, "gym") == {
        "status": "nonstarted",
        "createdDateTime": iso(created),
        "lastActionDateTime": iso(queued),
    }
    clock.advance(2)
    status = state.training_status(LARGE, "gym")
    assert status["status"] == "running"
    assert status["lastActionDateTime"] == iso(queued + 2)
    assert "lastSuccessfulTrainingDateTime" not in status
    clock.advance(3)
    assert state.training_status(LARGE, "gym") == {
        "status": "succeeded",
        "createdDateTime": iso(created),
        "lastActionDateTime": iso(queued + 5),
        "lastSuccessfulTrainingDateTime": iso(queued + 5),
    }


def test_identify_refuses_untrained_and_training_groups(
    state: FaceState, clock: ManualClock
) -> None:
    enrol(state, LARGE, "gym", 1)
    untrained = error_of(identify, state, "gym", vector(1))
    # Microsoft's error-code table: NotTrained is 400; TrainingNotFinished is 409.
    assert (untrained.status, untrained.code) == (400, "LargePersonGroupNotTrained")
    state.train(LARGE, "gym")
    training = error_of(identify, state, "gym", vector(1))
    assert (training.status, training.code) == (409, "LargePersonGroupTrainingNotFinished")
    clock.advance(5)
    assert len(identify(state, "gym", vector(1))) == 1


def test_identify_uses_the_faces_as_of_the_last_training(
    state: FaceState, clock: ManualClock
) -> None:
    (first,) = enrol(state, LARGE, "gym", 1)
    state.train(LARGE, "gym")
    clock.advance(5)
    late = state.create_person(LARGE, "gym", name="late", user_data=None)
    state.add_face(LARGE, "gym", late.person_id, vector(2), user_data=None)
    assert identify(state, "gym", vector(2)) == []
    state.train(LARGE, "gym")
    clock.advance(5)
    assert identify(state, "gym", vector(2))[0]["personId"] == late.person_id
    # A deleted person is never named, even before the group is trained again.
    state.delete_person(LARGE, "gym", first)
    assert identify(state, "gym", vector(1)) == []


def test_a_retraining_keeps_the_previous_model_until_it_ends(
    state: FaceState, clock: ManualClock
) -> None:
    enrol(state, LARGE, "gym", 1)
    state.train(LARGE, "gym")
    clock.advance(5)
    state.train(LARGE, "gym")
    clock.advance(2)
    status = state.training_status(LARGE, "gym")
    assert status["status"] == "running"
    assert "lastSuccessfulTrainingDateTime" in status


def test_training_a_group_without_faces_fails(state: FaceState, clock: ManualClock) -> None:
    state.create_group(SMALL, "empty", name="e", user_data=None, recognition_model="recognition_01")
    state.create_person(SMALL, "empty", name="nobody", user_data=None)
    state.train(SMALL, "empty")
    clock.advance(5)
    status = state.training_status(SMALL, "empty")
    assert status["status"] == "failed"
    assert status["message"]
    small = error_of(state.identify, SMALL, "empty", [], max_candidates=1, threshold=0.5)
    assert (small.status, small.code) == (400, "PersonGroupNotTrained")


def test_candidates_are_ranked_cut_by_count_and_threshold(
    state: FaceState, clock: ManualClock
) -> None:
    ids = enrol(state, LARGE, "gym", 1)
    close = state.create_person(LARGE, "gym", name="twin", user_data=None)
    state.add_face(LARGE, "gym", close.person_id, near(vector(1), 0.3), user_data=None)
    state.train(LARGE, "gym")
    clock.advance(5)
    both = identify(state, "gym", vector(1), max_candidates=5, threshold=0.0)
    assert [c["personId"] for c in both][:2] == [ids[0], close.person_id]
    assert both[0]["confidence"] == 1.0
    assert both[1]["confidence"] == pytest.approx(confidence(0.3, 0.6), abs=1e-4)
    assert len(identify(state, "gym", vector(1), max_candidates=1, threshold=0.0)) == 1
    assert [c["personId"] for c in identify(state, "gym", vector(1), threshold=0.9)] == [ids[0]]


def test_recognition_models_must_match(state: FaceState, clock: ManualClock) -> None:
    enrol(state, LARGE, "gym", 1)
    state.train(LARGE, "gym")
    clock.advance(5)
    face = probe(state, vector(1), model="recognition_01")
    error = error_of(state.identify, LARGE, "gym", [face], max_candidates=1, threshold=0.5)
    assert (error.status, error.code) == (400, "BadArgument")


def test_face_ids_expire_after_their_time_to_live(state: FaceState, clock: ManualClock) -> None:
    short = state.remember(vector(1), recognition_model="recognition_01", ttl=60)
    default = state.remember(vector(2), recognition_model="recognition_01", ttl=86400)
    clock.advance(59)
    assert state.detected(short) is not None
    clock.advance(2)
    assert state.detected(short) is None
    assert state.detected(default) is not None
    clock.advance(86400)
    assert state.detected(default) is None
    assert state.detected_count == 0


def test_at_most_248_faces_a_person(state: FaceState) -> None:
    enrol(state, LARGE, "gym")
    person = state.create_person(LARGE, "gym", name="many", user_data=None)
    for i in range(248):
        state.add_face(LARGE, "gym", person.person_id, vector(i), user_data=None)
    error = error_of(state.add_face, LARGE, "gym", person.person_id, vector(999), user_data=None)
    assert (error.status, error.code) == (403, "QuotaExceeded")


def test_persons_a_group_are_limited(clock: ManualClock) -> None:
    state = FaceState(clock=clock, limits=Limits(persons_per_person_group=2))
    enrol(state, SMALL, "small", 1, 2)
    error = error_of(state.create_person, SMALL, "small", name="third", user_data=None)
    assert (error.status, error.code) == (403, "QuotaExceeded")
    assert Limits().persons(SMALL) == 10_000
    assert Limits().persons(LARGE) == 1_000_000


def test_not_found_codes_name_the_kind(state: FaceState) -> None:
    assert error_of(state.group, SMALL, "none").code == "PersonGroupNotFound"
    assert error_of(state.group, LARGE, "none").code == "LargePersonGroupNotFound"
    enrol(state, LARGE, "gym")
    missing = "00000000-0000-4000-8000-000000000000"
    assert error_of(state.person, LARGE, "gym", missing).code == "PersonNotFound"
    person = state.create_person(LARGE, "gym", name="x", user_data=None)
    face = error_of(state.face, LARGE, "gym", person.person_id, missing)
    assert (face.status, face.code) == (404, "PersistedFaceNotFound")
    again = error_of(
        state.create_group,
        LARGE,
        "gym",
        name="x",
        user_data=None,
        recognition_model="recognition_01",
    )
    assert (again.status, again.code) == (409, "LargePersonGroupExists")


def test_lists_are_in_id_order_from_start(state: FaceState) -> None:
    for name in ("c", "a", "b"):
        enrol(state, SMALL, name)
    assert [g.group_id for g in state.list_groups(SMALL, start=None, top=1000)] == ["a", "b", "c"]
    assert [g.group_id for g in state.list_groups(SMALL, start="a", top=1)] == ["b"]
    ids = sorted(
        state.create_person(SMALL, "a", name=str(i), user_data=None).person_id for i in range(5)
    )
    assert [p.person_id for p in state.list_persons(SMALL, "a", start=ids[1], top=2)] == ids[2:4]


def test_state_survives_saving_and_loading(state: FaceState, clock: ManualClock) -> None:
    (person,) = enrol(state, LARGE, "gym", 1)
    state.train(LARGE, "gym")
    clock.advance(5)
    state.train(LARGE, "gym")
    saved = state.to_json()
    copy = FaceState(clock=clock, training_seconds=3, training_queue_seconds=2)
    copy.load_json(saved)
    assert copy.to_json() == saved
    assert copy.training_status(LARGE, "gym") == state.training_status(LARGE, "gym")
    clock.advance(5)
    assert identify(copy, "gym", vector(1))[0]["personId"] == person
    with pytest.raises(ValueError, match="not an emulator state file"):
        copy.load_json({"format": "something else"})


def test_confidence_is_one_half_at_the_threshold() -> None:
    assert confidence(0.0, 0.6) == 1.0
    assert confidence(0.6, 0.6) == 0.5
    assert confidence(1.2, 0.6) == 0.0
    assert confidence(3.0, 0.6) == 0.0


def test_latency_profiles_draw_within_their_range() -> None:
    rng = random.Random(1)
    field = LatencyProfile.named("field")
    draws = [field.sample(rng) for _ in range(2000)]
    assert min(draws) >= 0.7 and max(draws) <= 1.2
    assert statistics.median(draws) < 0.95, "skewed: most calls near the low end"
    assert LatencyProfile.named("none").sample(rng) == 0.0
    uniform = [LatencyProfile(100, 200).sample(rng) for _ in range(2000)]
    assert min(uniform) >= 0.1 and max(uniform) <= 0.2
    with pytest.raises(ValueError, match="unknown latency profile"):
        LatencyProfile.named("moon")
    with pytest.raises(ValueError):
        LatencyProfile(300, 100)


def test_flap_draws_repeat_for_a_seed() -> None:
    settings = FaultSettings(mode=FaultMode.FLAP)
    first = FaultPicker(settings, LatencyProfile(), seed=7)
    second = FaultPicker(settings, LatencyProfile(), seed=7)
    draws = [first.choose() for _ in range(200)]
    assert draws == [second.choose() for _ in range(200)]
    assert FaultMode.FLAP not in draws
    assert {FaultMode.HEALTHY, FaultMode.THROTTLE, FaultMode.ERROR500} <= set(draws)
    first.reseed(7)
    assert [first.choose() for _ in range(200)] == draws
    with pytest.raises(ValueError):
        FaultSettings(flap_weights={FaultMode.FLAP: 1.0})
    with pytest.raises(ValueError):
        FaultSettings(flap_weights={FaultMode.HEALTHY: 0.0})
