"""The matching index: exact distances, best and runner-up members, copy-on-write updates."""

from __future__ import annotations

import numpy as np
import pytest
from facegate_server.engines.index import FaceIndex
from facegate_server.engines.local import confidence


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
    assert confidence(0.0, 0.6) == 1.0
    assert confidence(0.6, 0.6) == 0.5
    assert confidence(0.3, 0.6) == pytest.approx(0.75)
    assert confidence(1.2, 0.6) == 0.0
    assert confidence(5.0, 0.6) == 0.0
