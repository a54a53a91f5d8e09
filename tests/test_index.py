"""The matching index: exact distances, best and runner-up members, copy-on-write updates."""

from __future__ import annotations

import numpy as np
import pytest
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.policy import confidence, distance_for


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.1, size=(n, 128))


def test_empty_index_matches_nothing() -> None:
    assert FaceIndex().match(vectors(1)[0]) is None


def test_distances_are_euclidean_and_members_combine_their_templates() -> None:
    v = vectors(5)
    index = FaceIndex([("a", v[0]), ("a", v[1]), ("b", v[2]), ("c", v[3])])
    probe = v[1] + 0.001
    match = index.match(probe)
    assert match is not None
    assert match.member_id == "a"
    assert match.distance == pytest.approx(np.linalg.norm(probe - v[1]), abs=1e-4)
    others = {m: np.linalg.norm(probe - v[i]) for m, i in [("b", 2), ("c", 3)]}
    runner = min(others, key=lambda m: others[m])
    assert match.runner_up_id == runner
    assert match.runner_up_distance == pytest.approx(others[runner], abs=1e-4)


def test_add_and_remove() -> None:
    v = vectors(4)
    index = FaceIndex([("a", v[0])])
    index.add("b", [v[1], v[2]])
    assert len(index) == 3 and index.member_count() == 2
    match = index.match(v[2])
    assert match is not None and match.member_id == "b"
    index.remove("b")
    match = index.match(v[2])
    assert match is not None and match.member_id == "a"
    assert match.runner_up_id == ""
    index.remove("a")
    assert index.match(v[2]) is None


def test_matches_brute_force_at_scale() -> None:
    v = vectors(5000, seed=1)
    owners = [f"m-{i // 2}" for i in range(len(v))]
    index = FaceIndex(zip(owners, v, strict=True))
    for probe in vectors(20, seed=2):
        match = index.match(probe)
        assert match is not None
        distances = np.linalg.norm(v - probe, axis=1)
        assert match.member_id == owners[int(np.argmin(distances))]
        assert match.distance == pytest.approx(distances.min(), abs=1e-4)


def test_confidence_mapping() -> None:
    """Fixed, whatever the threshold: 0.5 at dlib's 1:1 tolerance 0.6, monotone."""
    assert confidence(0.6) == 0.5
    assert confidence(0.55) == pytest.approx(0.622, abs=1e-3)
    assert confidence(0.35) == pytest.approx(0.924, abs=1e-3)
    assert confidence(0.0) == pytest.approx(0.9975, abs=1e-4)
    assert 0.0 < confidence(2.0) < 1e-5
    values = [confidence(d / 100) for d in range(0, 200)]
    assert values == sorted(values, reverse=True)
    assert distance_for(confidence(0.42)) == pytest.approx(0.42)


def test_nearest_lists_members_by_their_closest_template() -> None:
    v = vectors(6, seed=3)
    index = FaceIndex([("a", v[0]), ("a", v[1]), ("b", v[2]), ("c", v[3]), ("c", v[4])])
    probe = v[4] + 0.001
    expected = sorted(
        (min(np.linalg.norm(probe - v[i]) for i in rows), m)
        for m, rows in {"a": [0, 1], "b": [2], "c": [3, 4]}.items()
    )
    got = index.nearest(probe, 10)
    assert [m for m, _ in got] == [m for _, m in expected]
    assert [d for _, d in got] == pytest.approx([d for d, _ in expected], abs=1e-4)
    assert index.nearest(probe, 2) == got[:2]
    match = index.match(probe)
    assert match is not None
    assert (match.member_id, match.runner_up_id) == (got[0][0], got[1][0])
    assert FaceIndex().nearest(probe, 3) == []


def test_distance_to_one_member_is_to_their_closest_template_only() -> None:
    v = vectors(4)
    index = FaceIndex([("a", v[0]), ("a", v[1]), ("b", v[2])])
    probe = v[2] + 0.001  # b's face
    expected_a = min(np.linalg.norm(probe - v[0]), np.linalg.norm(probe - v[1]))
    assert index.distance("a", probe) == pytest.approx(expected_a, abs=1e-4)
    assert index.distance("b", probe) == pytest.approx(np.linalg.norm(probe - v[2]), abs=1e-4)
    assert index.distance("nobody", probe) == float("inf")
    index.remove("b")
    assert index.distance("b", probe) == float("inf")
    assert FaceIndex().distance("a", probe) == float("inf")


def test_one_by_one_additions_leave_earlier_snapshots_alone_and_match_a_fresh_build() -> None:
    """Additions write into spare room past the current rows: a snapshot a reader holds
    keeps exactly its rows, through growth and after removals, and the result equals an
    index built at once from the same templates."""
    rng = np.random.default_rng(3)
    index = FaceIndex()
    added: list[tuple[str, np.ndarray]] = []
    held = []
    for n in range(300):
        rows = [rng.normal(size=128) for _ in range(1 + n % 3)]
        index.add(f"m-{n}", rows)
        added += [(f"m-{n}", r) for r in rows]
        if n % 50 == 0:
            held.append((index._snapshot, len(added)))
        if n == 150:
            index.remove("m-7")
            added = [(m, r) for m, r in added if m != "m-7"]
    for snapshot, length in held:
        assert len(snapshot.owners) == length  # the reader's view never grew or changed
    fresh = FaceIndex(added)
    assert np.array_equal(index._snapshot.vectors, fresh._snapshot.vectors)
    assert [index._ids[c] for c in index._snapshot.owners] == [m for m, _ in added]
    for member_id, row in added[::37]:
        match = index.match(row)
        assert match is not None and match.member_id == member_id and match.distance < 0.05
