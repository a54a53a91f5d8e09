"""Synthetic members: random 128-d embeddings shaped like dlib's, kept far from every real
face, written straight into a SQLite store before the server starts (the server rebuilds
its matching index from the store at start).

The real people are enrolled through the API on top; a gallery of N members holds N - 5
synthetic ones. Synthetic embeddings are drawn per dimension from a normal distribution
with the real embeddings' mean and a spread shaped like theirs, scaled so that two
synthetic members are as far apart on average as two real people are (measured on the
enrolment photos; a spread estimated from 6 people alone comes out too narrow). Any draw
within `min_distance` of a real embedding (enrolment photos and probe frames) is drawn
again, so no synthetic member can be granted or make a real one ambiguous. That makes the
synthetic members easier to tell apart from the real ones than a real crowd would be;
matching costs the same whatever the vectors hold.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from facegate_server.engines.policy import DecisionPolicy

_POLICY = DecisionPolicy()
MIN_DISTANCE = _POLICY.match_threshold + _POLICY.match_margin + 0.05
"""Every synthetic embedding is at least this far from every real one: the policy's match
threshold plus its margin (0.55 + 0.10 by default), with 0.05 to spare. A probe's own
member is within 0.52 of it, so a synthetic member can be neither granted nor the close
runner-up."""

Vectors = npt.NDArray[np.float64]


def describe(real: Vectors) -> dict[str, Any]:
    """The real embeddings' norms and per-dimension spread (what the synthetic ones copy)."""
    norms = np.linalg.norm(real, axis=1)
    spread = real.std(axis=0)
    return {
        "count": len(real),
        "norm_mean": float(norms.mean()),
        "norm_min": float(norms.min()),
        "norm_max": float(norms.max()),
        "dimension_std_mean": float(spread.mean()),
        "dimension_std_min": float(spread.min()),
        "dimension_std_max": float(spread.max()),
    }


def pairwise_mean(vectors: Vectors) -> float:
    """The mean distance between two different rows."""
    n = len(vectors)
    if n < 2:
        return float("nan")
    sq = np.einsum("ij,ij->i", vectors, vectors)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * vectors @ vectors.T, 0.0))
    return float(d[np.triu_indices(n, 1)].mean())


def synthetic(
    n: int,
    real: Vectors,
    seed: int,
    between_people: float,
    min_distance: float = MIN_DISTANCE,
) -> tuple[Vectors, float]:
    """`n` random embeddings like `real` ones, two of them `between_people` apart on
    average, none within `min_distance` of a real one; and the spread's scale factor."""
    rng = np.random.default_rng(seed)
    mean, spread = real.mean(axis=0), real.std(axis=0)
    # Two independent draws differ by sqrt(2 * sum((k * spread)^2)) on average (about).
    scale = between_people / float(np.sqrt(2.0 * np.sum(spread**2)))
    spread = spread * scale
    real_sq = np.einsum("ij,ij->i", real, real)
    kept: list[Vectors] = []
    have = 0
    while have < n:
        batch = mean + spread * rng.standard_normal((max(1024, n - have), real.shape[1]))
        sq = np.einsum("ij,ij->i", batch, batch)[:, None] + real_sq[None, :] - 2 * batch @ real.T
        nearest = np.sqrt(np.maximum(sq, 0.0)).min(axis=1)
        batch = batch[nearest >= min_distance]
        kept.append(batch[: n - have])
        have += len(kept[-1])
    vectors = np.concatenate(kept) if kept else np.empty((0, real.shape[1]))
    return vectors, scale


def nearest_real(vectors: Vectors, real: Vectors) -> float:
    """The smallest distance from any of `vectors` to any real embedding (a check)."""
    if len(vectors) == 0:
        return float("inf")
    best = float("inf")
    for start in range(0, len(vectors), 8192):
        chunk = vectors[start : start + 8192]
        diff = np.einsum("ij,ij->i", chunk, chunk)[:, None] + np.einsum("ij,ij->i", real, real)
        sq = diff - 2 * chunk @ real.T
        best = min(best, float(np.sqrt(np.maximum(sq, 0.0)).min()))
    return best


def build_store(path: Path, vectors: Vectors) -> None:
    """A FaceGate SQLite store at `path` holding one synthetic member per vector
    (`syn-000001`, ...), through the store's own create_member.

    Durability is turned off on this connection only (a throwaway gallery, rebuilt if lost):
    100,000 members then take about 25 s instead of 4 minutes of fsyncs.
    """
    from facegate_server.domain import FaceTemplate
    from facegate_server.store.sqlite import SqliteStore

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    store = SqliteStore(partial)
    try:
        store._db.execute("PRAGMA synchronous=OFF")  # the benchmark's bulk load only
        now = datetime.now(UTC)
        for i, vector in enumerate(vectors, start=1):
            store.create_member(f"syn-{i:06d}", f"Synthetic {i}", [FaceTemplate(vector)], now)
    finally:
        store.close()  # the last connection: SQLite folds the WAL into the file
    os.replace(partial, path)


def cached_store(cache: Path, vectors: Vectors) -> Path:
    """A store holding `vectors`, built once per content and schema in `cache`."""
    from facegate_server.store.sqlite import SCHEMA_VERSION

    digest = hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).hexdigest()[:16]
    path = cache / f"gallery-{len(vectors)}-v{SCHEMA_VERSION}-{digest}.sqlite3"
    if not path.exists():
        build_store(path, vectors)
    return path


def data_dir_from(template: Path | None, data_dir: Path) -> Path:
    """A fresh data directory for one server, holding a copy of the gallery `template`."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=False)
    if template is not None:
        target = data_dir / "facegate.sqlite3"
        shutil.copyfile(template, target)
        target.chmod(0o600)
    return data_dir
