"""Prometheus metrics (metrics.py): scraped over HTTP from running servers and read with
prometheus_client's own parser, after real calls; and end to end, scraped by a real
Prometheus server (the Debian package `prometheus`) and read back from its query API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_server.commands.token import new_token
from facegate_server.config import SettingsError, load_settings
from facegate_server.engines.memory import MemoryEngine
from facegate_server.rpc import auth
from prometheus_client.parser import text_string_to_metric_families

from tests.cloud import cloud_gate, emulator
from tests.helpers import image_bytes, require_tool, running_server, start_serve

MEMBER_FACE = image_bytes(64, 64, color="red")
STRANGER = image_bytes(64, 64, color="blue")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample the endpoint serves: (name, labels) -> value, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_once_counted(port: int, code: str) -> Samples:
    """A scrape taken once the aborted Identify is counted. gRPC sends an abort's status to
    the caller before the abort returns into the counting interceptor, so the caller can
    see its error a moment before the count moves; a count that never moves still fails."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(port)
        counted = value(samples, "facegate_grpc_calls_total", method="Identify", code=code)
        if counted is not None or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def metrics_port(server: object) -> int:
    metrics = server.metrics  # type: ignore[attr-defined]
    assert metrics is not None
    port: int = metrics.port
    return port


@contextmanager
def fake_server(
    data: Path, **settings: object
) -> Iterator[tuple[object, pb_grpc.FaceGateServiceStub]]:
    with (
        running_server(
            data, engine=MemoryEngine(), metrics_listen="127.0.0.1:0", **settings
        ) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield server, pb_grpc.FaceGateServiceStub(channel)


def identify(stub: pb_grpc.FaceGateServiceStub, image: bytes) -> pb.IdentifyResponse:
    answer: pb.IdentifyResponse = stub.Identify(
        pb.IdentifyRequest(image=image, turnstile_id="gate-1"), timeout=30
    )
    return answer


def test_identify_and_verify_are_timed_by_engine_and_decision(tmp_path: Path) -> None:
    with fake_server(tmp_path) as (server, stub):
        stub.Enroll(pb.EnrollRequest(member_id="m-1", photos=[MEMBER_FACE]), timeout=30)
        for _ in range(3):
            assert identify(stub, MEMBER_FACE).decision == pb.DECISION_GRANTED
        for _ in range(2):
            assert identify(stub, STRANGER).decision == pb.DECISION_DENIED_UNKNOWN_FACE
        verified = stub.Verify(
            pb.VerifyRequest(member_id="m-1", image=MEMBER_FACE, turnstile_id="gate-1"),
            timeout=30,
        )
        assert verified.decision == pb.DECISION_GRANTED
        with pytest.raises(grpc.RpcError) as bad:
            stub.Identify(pb.IdentifyRequest(image=MEMBER_FACE, turnstile_id=""), timeout=30)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        samples = scrape_once_counted(metrics_port(server), "INVALID_ARGUMENT")

    name = "facegate_identify_duration_seconds"
    assert value(samples, f"{name}_count", engine="local", decision="GRANTED") == 3
    assert value(samples, f"{name}_count", engine="local", decision="DENIED_UNKNOWN_FACE") == 2
    # Every call is in the bucket at the budget (the in-memory engine answers in ms), and
    # the +Inf bucket counts them all.
    assert value(samples, f"{name}_bucket", engine="local", decision="GRANTED", le="1.2") == 3
    assert value(samples, f"{name}_bucket", engine="local", decision="GRANTED", le="+Inf") == 3
    assert value(samples, f"{name}_sum", engine="local", decision="GRANTED") > 0  # type: ignore[operator]
    verify = "facegate_verify_duration_seconds_count"
    assert value(samples, verify, engine="local", decision="GRANTED") == 1
    assert (
        value(samples, f"{name}_count", engine="local", decision="DENIED_NOT_THIS_MEMBER") is None
    )
    outcomes = "facegate_engine_outcomes_total"
    assert value(samples, outcomes, kind="identify", engine="local", outcome="DECIDED") == 5
    assert value(samples, outcomes, kind="verify", engine="local", outcome="DECIDED") == 1
    calls = "facegate_grpc_calls_total"
    assert value(samples, calls, method="Identify", code="OK") == 5
    assert value(samples, calls, method="Identify", code="INVALID_ARGUMENT") == 1
    assert value(samples, calls, method="Verify", code="OK") == 1
    assert value(samples, calls, method="Enroll", code="OK") == 1
    # The state, read from GetStatus's sources when scraped.
    assert value(samples, "facegate_members") == 1
    assert value(samples, "facegate_outbox_entries") == 0
    assert value(samples, "facegate_outbox_parked_entries") == 0
    assert value(samples, "facegate_can_decide") == 1
    assert value(samples, "facegate_recognition_queue_depth") == 0
    assert value(samples, "facegate_store_size_bytes") >= 4096  # type: ignore[operator]
    assert not [key for key in samples if key[0] == "facegate_circuit_breaker_state"]  # no cloud


def test_refused_calls_are_counted_by_their_code(tmp_path: Path) -> None:
    token = new_token()
    callers = f"turnstile gate-1 {auth.token_hash(token)}"
    with fake_server(tmp_path, tokens=callers) as (server, stub):
        with pytest.raises(grpc.RpcError) as refused:
            identify(stub, MEMBER_FACE)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        answer = stub.Identify(
            pb.IdentifyRequest(image=STRANGER, turnstile_id="gate-1"),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=30,
        )
        assert answer.decision == pb.DECISION_DENIED_UNKNOWN_FACE
        samples = scrape_once_counted(metrics_port(server), "UNAUTHENTICATED")
    calls = "facegate_grpc_calls_total"
    assert value(samples, calls, method="Identify", code="UNAUTHENTICATED") == 1
    assert value(samples, calls, method="Identify", code="OK") == 1
    # A refused call never reached the gate: no decision was timed.
    name = "facegate_identify_duration_seconds_count"
    assert value(samples, name, engine="local", decision="DENIED_UNKNOWN_FACE") == 1


def test_servers_in_one_process_keep_their_own_metrics(tmp_path: Path) -> None:
    with fake_server(tmp_path / "a") as (first, a), fake_server(tmp_path / "b") as (second, b):
        identify(a, STRANGER)
        identify(a, STRANGER)
        identify(b, STRANGER)
        name = "facegate_identify_duration_seconds_count"
        labels = {"engine": "local", "decision": "DENIED_UNKNOWN_FACE"}
        assert value(scrape(metrics_port(first)), name, **labels) == 2
        assert value(scrape(metrics_port(second)), name, **labels) == 1


def test_metrics_are_off_by_default_and_stop_with_the_server(tmp_path: Path) -> None:
    with running_server(tmp_path / "off", engine=MemoryEngine()) as server:
        assert server.metrics is None
    with fake_server(tmp_path / "on") as (server, _):
        port = metrics_port(server)
        scrape(port)
    with pytest.raises(urllib.error.URLError):
        scrape(port)


@pytest.mark.parametrize(
    "listen", ["9464", "localhost", "127.0.0.1:port", "a b:1", ":9464", "::1:9464", "h:99999"]
)
def test_a_bad_metrics_address_is_one_line(listen: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"FACEGATE_METRICS_LISTEN": listen})
    assert str(error.value).startswith("FACEGATE_METRICS_LISTEN=")
    assert "HOST:PORT" in str(error.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "[::1]:9464", "localhost:9464", ""])
def test_metrics_addresses_are_host_and_port(listen: str) -> None:
    assert load_settings({"FACEGATE_METRICS_LISTEN": listen}).metrics_listen == listen


def test_metrics_beyond_loopback_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server(tmp_path, engine=MemoryEngine(), metrics_listen="0.0.0.0:0") as server:
        scrape(metrics_port(server))
    assert any("metrics are served without authentication" in r.message for r in caplog.records)


def test_a_taken_metrics_port_stops_the_start_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with (
            pytest.raises(OSError, match=f"could not serve metrics on {listen}"),
            running_server(tmp_path, engine=MemoryEngine(), metrics_listen=listen),
        ):
            pass


def test_the_cloud_state_is_read_when_scraped(tmp_path: Path) -> None:
    """Circuit breaker, outbox (waiting and set aside) and the cloud's transactions by
    operation, against the Face API emulator: the figures GetStatus reports."""
    with (
        emulator() as emu,
        cloud_gate(emu, tmp_path, engine=MemoryEngine(), metrics_listen="127.0.0.1:0") as gate,
    ):
        port = metrics_port(gate.server)
        circuit = "facegate_circuit_breaker_state"
        samples = scrape(port)
        assert value(samples, circuit, engine="azure", state="closed") == 1
        assert value(samples, circuit, engine="azure", state="open") == 0

        # A photo with no face: the cloud refuses it (InvalidImage) and the entry is parked.
        gate.stub.Enroll(pb.EnrollRequest(member_id="m-1", photos=[STRANGER]), timeout=60)
        assert value(scrape(port), "facegate_outbox_entries") == 1
        gate.settle()
        for _ in range(3):  # FACEGATE_BREAKER_FAILURES' default: the circuit opens
            gate.router.breaker.record_failure()
        samples = scrape(port)
        status = gate.stub.GetStatus(pb.GetStatusRequest(), timeout=10)

    assert value(samples, "facegate_outbox_entries") == 0
    assert value(samples, "facegate_outbox_parked_entries") == 1 == status.outbox_parked
    assert value(samples, circuit, engine="azure", state="open") == 1
    assert value(samples, circuit, engine="azure", state="closed") == 0
    transactions = {
        dict(labels)["operation"]: count
        for (name, labels), count in samples.items()
        if name == "facegate_cloud_transactions_total"
    }
    assert transactions == {c.name: c.count for c in status.cloud_transactions}
    assert transactions["detect"] >= 1  # the refused photo


def test_worker_restarts_and_states_are_the_pools(tmp_path: Path) -> None:
    """A real recognition worker killed (as a dlib crash would): the pool replaces it, and
    the scrape says so, as GetStatus does."""
    with running_server(tmp_path, workers=1, metrics_listen="127.0.0.1:0") as server:
        router = server.gate.engine
        pool = router.local.pool  # type: ignore[attr-defined]
        port = metrics_port(server)
        samples = scrape(port)
        assert value(samples, "facegate_worker_restarts_total", slot="0") == 0
        assert value(samples, "facegate_workers", state="idle") == 1
        healed = threading.Event()

        def check() -> None:
            if pool.live() == 1 and pool.state()[0].restarts == 1:
                healed.set()

        pool.on_change(check)
        os.kill(pool.state()[0].pid, signal.SIGKILL)
        assert healed.wait(180), "the worker was not replaced"
        samples = scrape(port)
    assert value(samples, "facegate_worker_restarts_total", slot="0") == 1
    assert value(samples, "facegate_workers", state="idle") == 1
    assert value(samples, "facegate_workers", state="stopped") == 0
    assert value(samples, "facegate_can_decide") == 1


PROMETHEUS_HOW = (
    "apt-get install -y prometheus (Debian's package; only the binary is used, "
    "the test runs its own instance)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def query(api: str, expression: str) -> list[dict[str, object]]:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def test_a_real_prometheus_scrapes_the_identify_histogram(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus", PROMETHEUS_HOW)
    log = tmp_path / "facegate.log"
    process, target = start_serve(
        {"FACEGATE_DATA_DIR": str(tmp_path / "data"), "FACEGATE_WORKERS": "1"},
        log,
        "--metrics-listen",
        "127.0.0.1:0",
    )
    prom: subprocess.Popen[bytes] | None = None
    try:
        serving = next(
            json.loads(line)
            for line in log.read_text().splitlines()
            if line.startswith("{") and json.loads(line).get("msg") == "serving"
        )
        exporter = f"127.0.0.1:{serving['metrics_port']}"
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.FaceGateServiceStub(channel)
            for _ in range(3):  # a grey frame: the real local engine finds no face
                assert identify(stub, image_bytes(320, 240)).decision == pb.DECISION_DENIED_NO_FACE

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: facegate\n"
            f"    static_configs:\n      - targets: ['{exporter}']\n"
        )
        port = free_port()
        with (tmp_path / "prometheus.log").open("wb") as prometheus_log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=prometheus_log,
            )
        api = f"http://127.0.0.1:{port}"
        expression = (
            'facegate_identify_duration_seconds_count{job="facegate",engine="local",'
            'decision="DENIED_NO_FACE"}'
        )
        deadline, found = time.monotonic() + 90, []
        while time.monotonic() < deadline and prom.poll() is None:
            try:
                found = query(api, expression)
            except (urllib.error.URLError, ConnectionError):
                found = []  # not listening yet
            if found:
                break
            time.sleep(0.5)
        assert found, (
            f"Prometheus never had the series:\n{(tmp_path / 'prometheus.log').read_text()}"
        )
        assert float(found[0]["value"][1]) == 3  # type: ignore[index]
        up = query(api, 'up{job="facegate"}')
        assert float(up[0]["value"][1]) == 1  # type: ignore[index]
        buckets = query(api, 'facegate_identify_duration_seconds_bucket{le="+Inf"}')
        assert sum(float(b["value"][1]) for b in buckets) == 3  # type: ignore[index]
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(30)
        process.send_signal(signal.SIGTERM)
        process.wait(60)


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_alerts() -> str:
    """The example alerting rules of the README's Metrics section (its YAML block)."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def alert(name: str, at: str, fires: bool, summaries: dict[str, str], **labels: str) -> object:
    expected = [{"exp_labels": labels, "exp_annotations": {"summary": summaries[name]}}]
    return {"eval_time": at, "alertname": name, "exp_alerts": expected if fires else []}


def test_the_readme_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """The README's example alerts, checked and unit-tested by Prometheus' own promtool on
    made-up series: a circuit open for minutes, an outbox that grows (not one that only
    stands), and an Identify p99 above a second (not a fast one)."""
    promtool = require_tool("promtool", PROMETHEUS_HOW)
    rules = readme_alerts()
    (tmp_path / "rules.yml").write_text(rules)
    names = re.findall(r"- alert: (\w+)", rules)
    summaries = dict(zip(names, re.findall(r'summary: "([^"]*)"', rules), strict=True))
    slow = 'facegate_identify_duration_seconds_bucket{engine="local",decision="GRANTED",le="%s"}'
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'facegate_circuit_breaker_state{engine="azure",state="open"}',
                        "values": "0 0 0 1 1 1 1 1 1 1 1 1",
                    },
                    {"series": "facegate_outbox_entries", "values": "0+1x80"},
                    {"series": "facegate_outbox_parked_entries", "values": "0 0 2 2"},
                    {"series": slow % "1", "values": "0+0x30"},
                    {"series": slow % "1.5", "values": "0+10x30"},
                    {"series": slow % "+Inf", "values": "0+10x30"},
                ],
                "alert_rule_test": [
                    alert("FaceGateCloudCircuitOpen", "5m", False, summaries),
                    alert(
                        "FaceGateCloudCircuitOpen",
                        "10m",
                        True,
                        summaries,
                        engine="azure",
                        state="open",
                    ),
                    alert("FaceGateOutboxGrowing", "10m", False, summaries),
                    alert("FaceGateOutboxGrowing", "75m", True, summaries),
                    alert("FaceGateOutboxParked", "1m", False, summaries),
                    alert("FaceGateOutboxParked", "3m", True, summaries),
                    alert("FaceGateIdentifySlow", "25m", True, summaries),
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {"series": "facegate_outbox_entries", "values": "5x80"},  # stands: no alert
                    {"series": slow % "0.2", "values": "0+10x30"},
                    {"series": slow % "+Inf", "values": "0+10x30"},
                ],
                "alert_rule_test": [
                    alert("FaceGateOutboxGrowing", "75m", False, summaries),
                    alert("FaceGateIdentifySlow", "25m", False, summaries),
                ],
            },
        ],
    }
    (tmp_path / "tests.json").write_text(json.dumps(tests))  # JSON is YAML
    checked = subprocess.run(
        [promtool, "test", "rules", "tests.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(names) == 4


def test_a_missing_tool_skips_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "facegate-no-such-tool"
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="apt-get install it"):
        require_tool(missing, "apt-get install it")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and facegate-no-such-tool"):
        require_tool(missing, "apt-get install it")
    assert require_tool("sh", "always there") == shutil.which("sh")


def test_the_outbox_gauges_are_absent_while_the_chains_store_is_away() -> None:
    """A chain server cut off from PostgreSQL cannot read its outbox: the gauges are left
    out (absent, for `absent()` alerts) rather than reported as 0."""
    from facegate_server.domain import EngineStatus, Status
    from facegate_server.metrics import StatusCollector

    def names(unknown: bool) -> set[str]:
        status = Status(
            engines=EngineStatus(),
            outbox_depth=0,
            decisions={},
            member_count=1,
            shared_figures_unknown=unknown,
        )
        return {family.name for family in StatusCollector(lambda: status).collect()}

    assert {"facegate_outbox_entries", "facegate_outbox_parked_entries"} <= names(False)
    assert not {"facegate_outbox_entries", "facegate_outbox_parked_entries"} & names(True)
