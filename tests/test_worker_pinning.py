"""FACEGATE_WORKER_PIN (engines/pool.py): each recognition worker on a core of its own when
there are no more workers than cores, and nothing pinned otherwise. Real worker processes,
started with a trivial initializer (the models are not what is tested here)."""

from __future__ import annotations

import os

import pytest
from facegate_server.engines.pool import WorkerPool

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's"
)


def nothing(*_: object) -> None:
    """A worker initializer that loads no models."""


def pool(workers: int, pin: bool) -> WorkerPool:
    return WorkerPool(
        workers, max_bytes=1024, max_side=64, initializer=nothing, initargs=(), pin=pin
    )


def test_each_worker_gets_a_core_of_its_own_and_keeps_it_when_replaced() -> None:
    cores = sorted(os.sched_getaffinity(0))
    workers = pool(len(cores), pin=True)
    try:
        workers.warm_up(60)
        assert workers.live() == len(cores)
        pinned = [os.sched_getaffinity(pid) for pid in workers.pids()]
        assert sorted(core for mask in pinned for core in mask) == cores
        assert all(len(mask) == 1 for mask in pinned)
    finally:
        workers.close()


def test_more_workers_than_cores_or_pinning_off_leave_the_scheduler_free() -> None:
    cores = os.sched_getaffinity(0)
    for count, pin in ((len(cores) + 1, True), (1, False)):
        workers = pool(count, pin)
        try:
            workers.warm_up(60)
            assert workers.live() == count
            assert workers.cores == []
            assert all(os.sched_getaffinity(pid) == cores for pid in workers.pids())
        finally:
            workers.close()
