"""The in-memory matching index: every enrolled template, matched by brute force.

Built from the store at start and changed with every enrol and delete, in the server
process (workers only encode), so every Identify sees every committed change. Readers take
the current snapshot without a lock; writers replace it, so a match never sees half an
update: a removal copies, an addition writes past the end of the current rows into spare
room (no snapshot reaches there) and publishes the longer view, so adding members one by
one (a chain server catching up with thousands) costs what they add, not the gallery.

Distances are dlib's (Euclidean over the 128-d descriptors), computed for all rows at once
as |q|^2 + |g|^2 - 2 g.q with one float32 matrix product (~3 ms for 100k templates).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from facegate_server.domain import Embedding

DIMENSIONS = 128


@dataclass(frozen=True)
class Match:
    """The closest member and the closest other member (for a margin rule)."""

    member_id: str
    distance: float
    runner_up_id: str = ""
    runner_up_distance: float = float("inf")


@dataclass(frozen=True)
class _Snapshot:
    vectors: npt.NDArray[np.float32]  # (n, 128)
    sq_norms: npt.NDArray[np.float32]  # (n,)
    owners: npt.NDArray[np.int64]  # (n,) member codes: positions in FaceIndex._ids


class FaceIndex:
    def __init__(self, templates: Iterable[tuple[str, Embedding]] = ()) -> None:
        self._write_lock = threading.Lock()
        self._codes: dict[str, int] = {}
        self._ids: list[str] = []  # append-only, so any snapshot's codes stay valid
        owners: list[int] = []
        rows: list[Embedding] = []
        for member_id, embedding in templates:
            owners.append(self._code(member_id))
            rows.append(embedding)
        vectors = np.asarray(rows, np.float32).reshape(-1, DIMENSIONS)
        self._publish(
            vectors, np.einsum("ij,ij->i", vectors, vectors), np.asarray(owners, np.int64)
        )

    def _publish(
        self,
        vectors: npt.NDArray[np.float32],
        sq_norms: npt.NDArray[np.float32],
        owners: npt.NDArray[np.int64],
    ) -> None:
        """Fresh arrays become the rows (their own buffers, with no spare room)."""
        self._buffers = (vectors, sq_norms, owners)
        self._snapshot = _Snapshot(vectors, sq_norms, owners)

    def _code(self, member_id: str) -> int:
        code = self._codes.get(member_id)
        if code is None:
            code = self._codes[member_id] = len(self._ids)
            self._ids.append(member_id)
        return code

    def __len__(self) -> int:
        return len(self._snapshot.owners)

    def member_count(self) -> int:
        return len(np.unique(self._snapshot.owners))

    def has(self, member_id: str) -> bool:
        code = self._codes.get(member_id)
        return code is not None and bool(np.any(self._snapshot.owners == code))

    def add(self, member_id: str, embeddings: Iterable[Embedding]) -> None:
        new = np.asarray(list(embeddings), np.float32).reshape(-1, DIMENSIONS)
        with self._write_lock:
            n, k = len(self._snapshot.owners), len(new)
            vectors, sq_norms, owners = self._buffers
            if n + k > len(owners):  # no room left: a buffer twice as large
                room = max(2 * (n + k), 64)
                more_vectors = np.empty((room, DIMENSIONS), np.float32)
                more_norms = np.empty(room, np.float32)
                more_owners = np.empty(room, np.int64)
                more_vectors[:n], more_norms[:n], more_owners[:n] = (
                    vectors[:n],
                    sq_norms[:n],
                    owners[:n],
                )
                vectors, sq_norms, owners = more_vectors, more_norms, more_owners
                self._buffers = (vectors, sq_norms, owners)
            vectors[n : n + k] = new
            sq_norms[n : n + k] = np.einsum("ij,ij->i", new, new)
            owners[n : n + k] = self._code(member_id)
            self._snapshot = _Snapshot(vectors[: n + k], sq_norms[: n + k], owners[: n + k])

    def remove(self, member_id: str) -> None:
        with self._write_lock:
            code = self._codes.get(member_id)
            if code is None:
                return
            old = self._snapshot
            keep = old.owners != code
            self._publish(old.vectors[keep], old.sq_norms[keep], old.owners[keep])

    def remove_template(self, member_id: str, embedding: Embedding) -> bool:
        """Remove one of the member's templates (the row equal to `embedding`, as stored in
        float32); whether one was found. The member's other templates stay."""
        probe = np.asarray(embedding, np.float32).reshape(DIMENSIONS)
        with self._write_lock:
            code = self._codes.get(member_id)
            if code is None:
                return False
            old = self._snapshot
            rows = np.flatnonzero((old.owners == code) & np.all(old.vectors == probe, axis=1))
            if len(rows) == 0:
                return False
            keep = np.ones(len(old.owners), bool)
            keep[rows[0]] = False
            self._publish(old.vectors[keep], old.sq_norms[keep], old.owners[keep])
            return True

    @staticmethod
    def _distances(snap: _Snapshot, probe: Embedding) -> npt.NDArray[np.float32]:
        q = np.asarray(probe, np.float32)
        squared = snap.sq_norms + np.float32(q @ q) - 2.0 * (snap.vectors @ q)
        return np.sqrt(np.maximum(squared, 0.0))

    def nearest(self, probe: Embedding, k: int) -> list[tuple[str, float]]:
        """The `k` closest members, closest first, each with their closest template's distance."""
        snap = self._snapshot
        if len(snap.owners) == 0 or k < 1:
            return []
        distances = self._distances(snap, probe)
        per_member = np.full(len(self._ids), np.inf, np.float32)
        np.minimum.at(per_member, snap.owners, distances)
        present = np.flatnonzero(np.isfinite(per_member))
        order = present[np.argsort(per_member[present], kind="stable")[:k]]
        return [(self._ids[code], float(per_member[code])) for code in order]

    def distance(self, member_id: str, probe: Embedding) -> float:
        """The distance from `probe` to `member_id`'s closest template (infinity: none).

        The same work whoever is asked for, enrolled or not: the member's rows are picked
        by one comparison over every row, so the time taken does not say whether the id
        is enrolled.
        """
        snap = self._snapshot
        code = self._codes.get(member_id, -1)
        theirs = snap.owners == code
        rows = snap.vectors[theirs]
        if len(rows) == 0:
            return float("inf")
        q = np.asarray(probe, np.float32)
        squared = snap.sq_norms[theirs] + np.float32(q @ q) - 2.0 * (rows @ q)
        return float(np.sqrt(np.maximum(squared, 0.0)).min())

    def match(self, probe: Embedding) -> Match | None:
        """The closest member to `probe` and the closest other member (None: empty index).

        A member's distance is that of their closest template: every enrolled photo counts,
        so a member enrolled from several angles is matched by the nearest of them.
        """
        snap = self._snapshot
        if len(snap.owners) == 0:
            return None
        distances = self._distances(snap, probe)
        best = int(np.argmin(distances))
        best_code = snap.owners[best]
        other_distances = np.where(snap.owners != best_code, distances, np.inf)
        runner = int(np.argmin(other_distances))
        if not np.isfinite(other_distances[runner]):
            return Match(self._ids[best_code], float(distances[best]))
        return Match(
            self._ids[best_code],
            float(distances[best]),
            self._ids[snap.owners[runner]],
            float(distances[runner]),
        )
