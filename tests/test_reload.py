"""Reload without a restart: SIGHUP makes a real `facegate serve` re-read its callers (the
tokens file) and its TLS certificate, key and client CA, while calls keep being answered;
a file that cannot be used is refused, logged, and the old configuration kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_client import FaceGateClient, PermissionDenied, Unauthenticated, Unavailable
from facegate_server.commands.token import new_token
from facegate_server.rpc.auth import token_hash

from tests.helpers import image_bytes, start_serve
from tests.pki import Authority

FRAME = image_bytes(640, 360)  # no face: an Identify the engine really runs, then denies


def tokens_line(role: str, name: str, token: str) -> str:
    return f"{role} {name} {token_hash(token)}\n"


def write_private(path: Path, text: str) -> None:
    """Replace `path` as an operator's tool would: a new file, renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.chmod(fresh, 0o600)
    fresh.replace(path)


def log_entries(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def at(entry: dict[str, object]) -> float:
    return datetime.fromisoformat(str(entry["time"])).timestamp()


def hang_up(process: subprocess.Popen[str], log: Path) -> dict[str, object]:
    """SIGHUP, then the server's answer: its `reloaded` or `reload refused` log line."""
    done = {"reloaded", "reload refused: the previous callers and certificate stay"}
    before = sum(1 for e in log_entries(log) if e["msg"] in done)
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answers = [e for e in log_entries(log) if e["msg"] in done]
        if len(answers) > before:
            return answers[-1]
        assert process.poll() is None, f"the server died on SIGHUP:\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"no reload logged:\n{log.read_text()}")


class Served:
    def __init__(self, tmp: Path, **extra: str) -> None:
        self.tmp = tmp
        self.log = tmp / "serve.log"
        self.tokens_file = tmp / "callers.txt"
        self.gate, self.crm = new_token(), new_token()
        write_private(
            self.tokens_file,
            tokens_line("turnstile", "gate-1", self.gate) + tokens_line("backend", "crm", self.crm),
        )
        settings = {
            "FACEGATE_DATA_DIR": str(tmp / "data"),
            "FACEGATE_WORKERS": "1",
            "FACEGATE_IDENTIFY_RATE": "0",
            "FACEGATE_TOKENS_FILE": str(self.tokens_file),
            **extra,
        }
        self.process, self.target = start_serve(settings, self.log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path)
    yield server
    server.stop()


def test_a_removed_token_is_refused_after_sighup_and_the_others_still_work(
    served: Served,
) -> None:
    with (
        FaceGateClient(served.target, token=served.gate) as gate,
        FaceGateClient(served.target, token=served.crm) as crm,
    ):
        assert gate.identify(FRAME, "gate-1").decision == pb.DECISION_DENIED_NO_FACE
        crm.list_members()

        write_private(served.tokens_file, tokens_line("backend", "crm", served.crm))
        answer = hang_up(served.process, served.log)

        assert answer["msg"] == "reloaded" and answer["callers"] == 1
        with pytest.raises(Unauthenticated):  # the same channel: the table, not the connection
            gate.identify(FRAME, "gate-1")
        crm.list_members()
        assert crm.identify(FRAME, "gate-1").decision == pb.DECISION_DENIED_NO_FACE

    # A role changed by a reload: crm becomes a turnstile, and may no longer list members.
    write_private(served.tokens_file, tokens_line("turnstile", "crm", served.crm))
    assert hang_up(served.process, served.log)["msg"] == "reloaded"
    with FaceGateClient(served.target, token=served.crm) as crm:
        with pytest.raises(PermissionDenied, match="turnstile callers may not call ListMembers"):
            crm.list_members()
        crm.identify(FRAME, "gate-1")


def test_calls_in_flight_across_sighup_are_all_answered(tmp_path: Path) -> None:
    # Budget enough for two callers queueing on one worker: every call must be answered OK.
    served = Served(tmp_path, FACEGATE_IDENTIFY_BUDGET_MS="30000")
    stop = threading.Event()
    answered: list[int] = []
    failures: list[BaseException] = []

    def caller(token: str, identify: bool) -> None:
        count = 0
        with FaceGateClient(served.target, token=token, identify_timeout=30) as client:
            while not stop.is_set():
                try:
                    if identify:
                        client.identify(FRAME, "gate-1")
                    else:
                        client.list_members(timeout=30)
                    count += 1
                except BaseException as error:  # every failure is the finding
                    failures.append(error)
                    return
        answered.append(count)

    threads = [
        threading.Thread(target=caller, args=(served.gate, True)),
        threading.Thread(target=caller, args=(served.gate, True)),
        threading.Thread(target=caller, args=(served.crm, False)),
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        for _ in range(5):  # the same callers, re-read five times while calls run
            assert hang_up(served.process, served.log)["msg"] == "reloaded"
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        served.stop()
    assert failures == []
    assert len(answered) == 3 and all(count > 0 for count in answered), answered
    entries = log_entries(served.log)
    requests = [e for e in entries if e.get("method") == "Identify"]
    assert requests and all(e.get("code") == "OK" for e in requests)
    # Calls were in flight while the server reloaded: one started before and ended after.
    reloads = [at(e) for e in entries if e["msg"] == "reloaded"]
    spans = [(at(e) - float(str(e["latency_ms"])) / 1000, at(e)) for e in requests]
    assert any(start < reload < end for reload in reloads for start, end in spans)


def test_a_malformed_tokens_file_is_refused_and_the_old_callers_kept(served: Served) -> None:
    served.tokens_file.write_text("turnstile gate-1 " + served.gate + "\n")  # a raw token
    answer = hang_up(served.process, served.log)
    assert answer["msg"] == "reload refused: the previous callers and certificate stay"
    assert "line 1" in str(answer["error"]) and "sha256:" in str(answer["error"])
    assert answer["level"] == "ERROR"
    assert served.gate not in served.log.read_text()  # the pasted token is never logged
    with FaceGateClient(served.target, token=served.gate) as gate:
        gate.identify(FRAME, "gate-1")
    with FaceGateClient(served.target, token=served.crm) as crm:
        crm.list_members()

    # Missing, and empty (that would open the server): refused too.
    served.tokens_file.unlink()
    assert "No such file" in str(hang_up(served.process, served.log)["error"])
    write_private(served.tokens_file, "# nobody\n")
    assert "open the server" in str(hang_up(served.process, served.log)["error"])
    with FaceGateClient(served.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_members()
    with FaceGateClient(served.target, token=served.crm) as crm:
        crm.list_members()


def test_sighup_serves_a_rotated_certificate_to_new_connections(tmp_path: Path) -> None:
    old_ca, new_ca = Authority("old-ca"), Authority("new-ca")
    cert, key = old_ca.server().write(tmp_path, "server")
    server = Served(tmp_path, FACEGATE_TLS_CERT=str(cert), FACEGATE_TLS_KEY=str(key))
    try:
        with FaceGateClient(server.target, token=server.crm, root_certificates=old_ca.pem) as c:
            c.list_members()

        new_cert, new_key = new_ca.server().write(tmp_path, "renewed")
        new_cert.replace(cert)
        new_key.replace(key)
        answer = hang_up(server.process, server.log)
        assert answer["msg"] == "reloaded" and answer["tls"] == "server"

        with FaceGateClient(server.target, token=server.crm, root_certificates=new_ca.pem) as c:
            c.list_members()
        with (
            FaceGateClient(server.target, token=server.crm, root_certificates=old_ca.pem) as c,
            pytest.raises(Unavailable),
        ):
            c.list_members()

        # A key that is not the certificate's: refused, the renewed certificate still served.
        key.write_bytes(old_ca.server().key)
        answer = hang_up(server.process, server.log)
        assert answer["msg"] == "reload refused: the previous callers and certificate stay"
        assert "not the certificate's" in str(answer["error"])
        with FaceGateClient(server.target, token=server.crm, root_certificates=new_ca.pem) as c:
            c.list_members()
    finally:
        server.stop()


def test_sighup_rotates_the_client_ca_for_new_connections(tmp_path: Path) -> None:
    server_ca, old_clients, new_clients = Authority("server"), Authority("old"), Authority("new")
    cert, key = server_ca.server().write(tmp_path, "server")
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(old_clients.pem)
    server = Served(
        tmp_path,
        FACEGATE_TLS_CERT=str(cert),
        FACEGATE_TLS_KEY=str(key),
        FACEGATE_TLS_CLIENT_CA=str(client_ca),
    )

    def client(authority: Authority) -> FaceGateClient:
        pem = authority.client("crm-host")
        return FaceGateClient(
            server.target,
            token=server.crm,
            root_certificates=server_ca.pem,
            certificate_chain=pem.cert,
            private_key=pem.key,
        )

    try:
        with client(old_clients) as c:
            c.list_members()
        with client(new_clients) as c, pytest.raises(Unavailable):
            c.list_members()

        client_ca.write_bytes(new_clients.pem)
        answer = hang_up(server.process, server.log)
        assert answer["msg"] == "reloaded" and answer["tls"] == "mutual"

        with client(new_clients) as c:
            c.list_members()
        with client(old_clients) as c, pytest.raises(Unavailable):
            c.list_members()
    finally:
        server.stop()
