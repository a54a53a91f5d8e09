"""Every answer the Face API can give that is not a result becomes a CloudFailure with a clear
outcome, through the real SDK (msrest, requests) talking to a canned HTTP server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from facegate_server.cloud.azure import AzureFace, AzureSettings, CloudFailure
from facegate_server.domain import EngineOutcome


class Canned:
    status = 200
    body = b"[]"
    headers: dict[str, str] = {}  # noqa: RUF012 - set per test
    delay = 0.0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding") == "chunked":  # the SDK streams uploads
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                self.rfile.read(size + 2)
            self.rfile.readline()
        else:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if Canned.delay:
            threading.Event().wait(Canned.delay)
        try:
            self.send_response(Canned.status)
            for name, value in {"Content-Type": "application/json", **Canned.headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(Canned.body)))
            self.end_headers()
            self.wfile.write(Canned.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the read-timeout test)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


CASES = [
    (401, error("401", "Access denied due to invalid subscription key."), {}, "ERROR", "HTTP 401"),
    (
        403,
        error("UnsupportedFeature", "Feature is not supported."),
        {},
        "ERROR",
        "UnsupportedFeature",
    ),
    (
        404,
        error("PersonGroupNotFound", "Person group is not found."),
        {},
        "ERROR",
        "PersonGroupNotFound",
    ),
    (
        409,
        error("PersonGroupNotTrained", "Person group not trained."),
        {},
        "NOT_TRAINED",
        "NotTrained",
    ),
    (
        409,
        error("PersonGroupTrainingNotFinished", "Training not finished."),
        {},
        "NOT_TRAINED",
        "TrainingNotFinished",
    ),
    (429, error("429", "Rate limit is exceeded."), {"Retry-After": "7"}, "THROTTLED", "HTTP 429"),
    (500, error("InternalServerError", "Oops."), {}, "ERROR", "HTTP 500"),
    (503, b"Service Unavailable", {"Content-Type": "text/plain"}, "ERROR", "HTTP 503"),
    (200, b"{this is not json", {}, "ERROR", "malformed"),
    (200, b'{"unexpected": "shape"}', {}, "ERROR", ""),
]


@pytest.mark.parametrize(("status", "body", "headers", "outcome", "words"), CASES)
def test_http_answers_are_mapped(
    endpoint: str, status: int, body: bytes, headers: dict[str, str], outcome: str, words: str
) -> None:
    Canned.status, Canned.body, Canned.headers, Canned.delay = status, body, headers, 0.0
    face = AzureFace(AzureSettings(endpoint, "secret-key", read_timeout=2))
    with pytest.raises(CloudFailure) as failure:
        face.identify("face-id", timeout=2)
    assert failure.value.outcome is EngineOutcome[outcome]
    assert words in failure.value.detail
    assert "secret-key" not in failure.value.detail
    if status == 429:
        assert failure.value.retry_after == 7.0


def test_a_read_timeout_is_timed_out(endpoint: str) -> None:
    Canned.status, Canned.body, Canned.headers, Canned.delay = 200, b"[]", {}, 1.0
    face = AzureFace(AzureSettings(endpoint, "k"))
    with pytest.raises(CloudFailure) as failure:
        face.detect(b"\xff\xd8" + bytes(4000), timeout=0.2)
    assert failure.value.outcome is EngineOutcome.TIMED_OUT


def test_a_refused_connection_is_an_error_without_retries() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    face = AzureFace(AzureSettings(f"http://127.0.0.1:{port}", "k"))
    with pytest.raises(CloudFailure) as failure:
        face.detect(b"\xff\xd8" + bytes(4000), timeout=1)
    assert failure.value.outcome is EngineOutcome.ERROR
    assert "connect" in failure.value.detail
    assert face.counter.totals() == {"detect": 1}


def test_the_sdk_does_not_retry_posts(endpoint: str) -> None:
    Canned.status, Canned.body, Canned.headers, Canned.delay = 503, b"{}", {}, 0.0
    requests_seen = []
    original = Handler.do_POST

    def counting(self: Handler) -> None:
        requests_seen.append(self.path)
        original(self)

    Handler.do_POST = counting  # type: ignore[method-assign]
    try:
        face = AzureFace(AzureSettings(endpoint, "k"))
        with pytest.raises(CloudFailure):
            face.add_face("person", b"\xff\xd8" + bytes(4000), "tag")
    finally:
        Handler.do_POST = original  # type: ignore[method-assign]
    assert len(requests_seen) == 1  # msrest would have sent it 4 times


def test_an_image_under_a_kilobyte_is_not_sent() -> None:
    from facegate_server.cloud.engine import AzureEngine, CloudPeople
    from facegate_server.store import MemoryStore

    face = AzureFace(AzureSettings("http://127.0.0.1:9", "key"))  # nothing listens there
    engine = AzureEngine(face, CloudPeople(MemoryStore()))
    with pytest.raises(CloudFailure) as refused:
        engine.identify(b"x" * 1023, 1.0)
    assert refused.value.outcome is EngineOutcome.NOT_USED
    assert not refused.value.engine_fault  # no reason to open the circuit
    assert face.counter.total() == 0  # no call, no transaction
