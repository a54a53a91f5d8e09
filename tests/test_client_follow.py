"""The client's followers of the access log against a scripted fake server: `watch_events`
raises typed errors; `follow_events` reconnects after the last id it yielded, backs off
while reconnecting fails, waits out RetryInfo, and stops on errors a retry cannot mend.
No sleeping: the helper's `sleep` is injected."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client import FaceGateClient, PermissionDenied, Unavailable, cli
from facegate_client.errors import FaceGateError
from google.rpc import code_pb2

from tests.helpers import serving
from tests.test_client_errors import rich_status

STOPPING = rich_status(code_pb2.UNAVAILABLE, "the server is stopping", "SERVER_STOPPING")
DOWN = rich_status(code_pb2.UNAVAILABLE, "connection refused", "")
LIMIT = rich_status(code_pb2.RESOURCE_EXHAUSTED, "too many", "FOLLOWERS_LIMIT", retry_delay=7.0)
DENIED = rich_status(code_pb2.PERMISSION_DENIED, "turnstiles may not", "ROLE_NOT_ALLOWED")


@dataclass
class Scripted(pb_grpc.FaceGateServiceServicer):
    """Each WatchAccessEvents call plays the next script: the ids of the stored events
    after the request's id (at most `n` of them), then its ending status."""

    log: list[int]
    scripts: list[tuple[int, grpc.Status | None]]
    requests: list[pb.WatchAccessEventsRequest] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    list_failures: list[grpc.Status] = field(default_factory=list)

    def WatchAccessEvents(
        self, request: pb.WatchAccessEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchAccessEventsResponse]:
        self.requests.append(request)
        n, ending = self.scripts.pop(0) if self.scripts else (0, None)
        for event_id in [i for i in self.log if i > request.after_event_id][:n]:
            yield pb.WatchAccessEventsResponse(
                event=pb.AccessEvent(event_id=event_id, turnstile_id=request.turnstile_id)
            )
        if ending is not None:
            context.abort_with_status(ending)
        self.release.wait(30)  # a live stream with nothing new: until the test ends

    def ListAccessEvents(
        self, request: pb.ListAccessEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAccessEventsResponse:
        if self.list_failures:
            context.abort_with_status(self.list_failures.pop(0))
        newest = sorted(self.log, reverse=True)[: request.page_size]
        return pb.ListAccessEventsResponse(events=[pb.AccessEvent(event_id=i) for i in newest])


def follow(client: FaceGateClient, n: int, **options: Any) -> tuple[list[int], list[float]]:
    waits: list[float] = []
    events = client.follow_events(sleep=waits.append, **options)
    got = [next(events).event_id for _ in range(n)]
    events.close()
    return got, waits


def test_watch_events_streams_and_raises_typed_errors() -> None:
    servicer = Scripted(log=[3, 5, 8], scripts=[(2, STOPPING), (0, DENIED)])
    with serving(servicer) as target, FaceGateClient(target) as client:
        stream = client.watch_events(4, turnstile_id="gate-1", decisions=[pb.DECISION_GRANTED])
        assert [e.event_id for e in (next(stream), next(stream))] == [5, 8]
        with pytest.raises(Unavailable) as ended:
            next(stream)
        assert ended.value.reason == "SERVER_STOPPING"
        with pytest.raises(PermissionDenied):
            next(client.watch_events())
    first = servicer.requests[0]
    assert (first.after_event_id, first.turnstile_id) == (4, "gate-1")
    assert list(first.decisions) == [pb.DECISION_GRANTED]


def test_follow_resumes_after_the_last_event_yielded_once_each() -> None:
    servicer = Scripted(log=[1, 2, 3, 4, 5], scripts=[(2, STOPPING), (0, DOWN), (3, DOWN)])
    with serving(servicer) as target, FaceGateClient(target) as client:
        got, waits = follow(client, 5, member_id="m-1")
    assert got == [1, 2, 3, 4, 5]
    assert [r.after_event_id for r in servicer.requests] == [0, 2, 2]
    assert all(r.member_id == "m-1" for r in servicer.requests)
    assert len(waits) == 2  # after the stop, after the refused reconnect
    assert 0.4 <= waits[0] <= 0.6 and 0.8 <= waits[1] <= 1.2  # doubling, with jitter


def test_backoff_grows_to_its_ceiling_and_restarts_after_an_event() -> None:
    servicer = Scripted(log=[1, 2], scripts=[(0, DOWN)] * 6 + [(1, DOWN), (0, DOWN), (1, None)])
    with serving(servicer) as target, FaceGateClient(target) as client:
        got, waits = follow(client, 2, backoff=1.0, max_backoff=8.0)
    assert got == [1, 2]
    # Doubling to the ceiling while refused; from `backoff` again once an event came.
    expected = [1, 2, 4, 8, 8, 8, 1, 2]
    assert len(waits) == len(expected)
    assert all(0.8 * e <= w <= 1.2 * e for w, e in zip(waits, expected, strict=True))


def test_a_limit_is_waited_out_as_the_server_says() -> None:
    servicer = Scripted(log=[1], scripts=[(0, LIMIT), (1, None)])
    with serving(servicer) as target, FaceGateClient(target) as client:
        got, waits = follow(client, 1)
    assert got == [1] and waits == [7.0]


def test_errors_a_retry_cannot_mend_end_the_follower() -> None:
    servicer = Scripted(log=[1, 2], scripts=[(1, STOPPING), (0, DENIED)])
    with serving(servicer) as target, FaceGateClient(target) as client:
        events = client.follow_events(sleep=lambda _: None)
        assert next(events).event_id == 1
        with pytest.raises(FaceGateError) as ended:
            next(events)
    assert ended.value.code == grpc.StatusCode.PERMISSION_DENIED


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_follow_prints_events_as_they_come_and_says_when_it_resumes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer = Scripted(log=[1, 2, 3, 4], scripts=[(1, STOPPING), (2, None)])
    with serving(servicer) as target:
        code, out, err = run(
            capsys, "events", "--follow", "--after", "1", "--limit", "3", "--target", target
        )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and all("UNSPECIFIED" in line for line in lines)
    assert [r.after_event_id for r in servicer.requests] == [1, 2]
    assert "SERVER_STOPPING" in err and "resuming after event 2" in err


def test_cli_follow_starts_before_the_last_ten_and_prints_json_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer = Scripted(log=list(range(1, 31)), scripts=[(10, None)])
    with serving(servicer) as target:
        code, out, err = run(
            capsys, "events", "--follow", "--json", "--limit", "10", "--target", target
        )
    assert code == 0, err
    assert servicer.requests[0].after_event_id == 20  # the last 10: 21..30
    assert [int(json.loads(line)["event_id"]) for line in out.splitlines()] == list(range(21, 31))


def test_cli_follow_started_while_the_store_is_away_waits_for_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Where to start (the last ten) is asked of the log; while the chain's store does not
    answer (past the channel's own three attempts), the follower says so and asks again,
    as it reconnects a stream."""
    away = rich_status(code_pb2.UNAVAILABLE, "the shared store is unreachable", "STORE_UNAVAILABLE")
    servicer = Scripted(log=list(range(1, 13)), scripts=[(2, None)], list_failures=[away] * 3)
    with serving(servicer) as target:
        code, out, err = run(capsys, "events", "--follow", "--limit", "2", "--target", target)
    assert code == 0, err
    assert "STORE_UNAVAILABLE" in err and "resuming with the last 10 in" in err
    assert servicer.requests[0].after_event_id == 2  # the last 10: 3..12
    assert len(out.splitlines()) == 2


def test_cli_follow_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "events", "--after", "3", "--target", "127.0.0.1:1")
    assert code == 2 and "--after ID goes with --follow" in err
    code, _, err = run(
        capsys, "events", "--follow", "--since", "2026-11-01", "--target", "127.0.0.1:1"
    )
    assert code == 2 and "--since and --until do not go with --follow" in err
    code, _, err = run(capsys, "events", "--follow", "--after", "-1")
    assert code == 2


def test_cli_follow_ends_on_an_error_a_retry_cannot_mend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    servicer = Scripted(log=[1], scripts=[(0, DENIED)])
    with serving(servicer) as target:
        code, out, err = run(capsys, "events", "--follow", "--after", "0", "--target", target)
    assert code == 1 and out == ""
    assert "PERMISSION_DENIED" in err and "ROLE_NOT_ALLOWED" in err
