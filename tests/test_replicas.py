"""Replicas for one gym: a client pointed at several servers spreads its calls over them
(round_robin), keeps being answered when one stops or is killed, and retries Identify and
Verify once, on another server, when a call fails with UNAVAILABLE."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from facegate_client import FaceGateClient, cli
from facegate_client.client import channel_target
from facegate_client.errors import FaceGateError
from facegate_server.app import FaceGateServer
from facegate_server.domain import EventFilter
from facegate_server.engines.memory import MemoryEngine

from tests.conftest import Faces
from tests.helpers import image_bytes, running_server, serving, start_serve
from tests.pki import Authority

FRAME = image_bytes(64, 64, "PNG", "olive")  # MemoryEngine: the same bytes are one face


def events(server: FaceGateServer) -> int:
    return len(server.store.list_events(EventFilter(), 10_000))


@contextmanager
def two_servers(tmp_path: Path) -> Iterator[tuple[list[FaceGateServer], list[Any]]]:
    """Two real servers (the in-memory engine), each with member m-1 enrolled from FRAME;
    the second item is each server's way to stop it (once)."""
    with ExitStack() as stack:
        servers, stops = [], []
        for n in range(2):
            context = running_server(tmp_path / f"s{n}", engine=MemoryEngine())
            server = context.__enter__()
            stopped = threading.Event()

            def stop(context: Any = context, stopped: threading.Event = stopped) -> None:
                if not stopped.is_set():
                    stopped.set()
                    context.__exit__(None, None, None)

            stack.callback(stop)
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                pb_grpc.FaceGateServiceStub(channel).Enroll(
                    pb.EnrollRequest(member_id="m-1", photos=[FRAME]), timeout=10
                )
            servers.append(server)
            stops.append(stop)
        yield servers, stops


class Turnstile:
    """Identify in a loop on another thread, each call's start time and outcome kept."""

    def __init__(self, client: FaceGateClient) -> None:
        self.client = client
        self.calls: list[tuple[float, float, str]] = []  # (started, ended, decision or error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = self.client.identify(FRAME, "gate-1")
                outcome = pb.Decision.Name(answer.decision)
            except FaceGateError as error:
                outcome = f"error: {error}"
            self.calls.append((started, time.monotonic(), outcome))
            time.sleep(0.01)

    def __enter__(self) -> Turnstile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def count(self) -> int:
        return len(self.calls)


def wait_calls(turnstile: Turnstile, more: int, timeout: float = 60) -> None:
    target = turnstile.count() + more
    deadline = time.monotonic() + timeout
    while turnstile.count() < target:
        assert time.monotonic() < deadline, "the turnstile made too few calls"
        time.sleep(0.05)


def test_a_stopped_server_leaves_every_later_call_answered(tmp_path: Path) -> None:
    with (
        two_servers(tmp_path) as (servers, stops),
        FaceGateClient(
            f"127.0.0.1:{servers[0].port},127.0.0.1:{servers[1].port}", identify_timeout=10
        ) as client,
        Turnstile(client) as turnstile,
    ):
        wait_calls(turnstile, 40)
        assert events(servers[0]) > 0 and events(servers[1]) > 0  # both served calls
        before = events(servers[1])
        stopping = time.monotonic()
        stops[0]()
        stopped = time.monotonic()
        wait_calls(turnstile, 40)
        assert events(servers[1]) >= before + 40  # the rest went to the other one
    after = [c for c in turnstile.calls if c[0] >= stopped]
    assert len(after) >= 30  # (of the 40 counted, some began while it was stopping)
    assert all(outcome == "DECISION_GRANTED" for _, _, outcome in after), after
    # Only a call in flight while the server stopped may have failed.
    failed = [c for c in turnstile.calls if c[2] != "DECISION_GRANTED"]
    assert all(c[0] < stopped and c[1] >= stopping for c in failed), failed


def test_tls_replicas_are_checked_against_the_name_their_certificates_carry(
    tmp_path: Path,
) -> None:
    """Both servers hold a certificate for gate.example only; the client reaches them by
    address, and checks the certificates against the server name it is given."""
    authority = Authority("FaceGate test CA")
    cert, key = authority.named_server("gate.example").write(tmp_path, "server")
    with (
        running_server(tmp_path / "a", engine=MemoryEngine(), tls_cert=cert, tls_key=key) as a,
        running_server(tmp_path / "b", engine=MemoryEngine(), tls_cert=cert, tls_key=key) as b,
    ):
        target = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
        tls = {"root_certificates": authority.pem, "server_name": "gate.example", "timeout": 10}
        with FaceGateClient(f"127.0.0.1:{a.port}", **tls) as only_a:  # type: ignore[arg-type]
            only_a.enroll("m-a", [FRAME])
        with FaceGateClient(target, **tls) as client:  # type: ignore[arg-type]
            seen = {len(client.list_members().members) for _ in range(20)}
        assert seen == {0, 1}  # both answered (round_robin): a has m-a, b has nobody
        with (
            FaceGateClient(target, root_certificates=authority.pem, timeout=3) as unnamed,
            pytest.raises(FaceGateError),
        ):
            unnamed.list_members()  # 127.0.0.1 is not the name the certificates carry


SERVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from facegate_server.engines.memory import MemoryEngine
    from tests.helpers import running_server
    with running_server(Path(sys.argv[1]), engine=MemoryEngine()) as server:
        print(server.port, flush=True)
        time.sleep(600)
    """
)


def test_a_frozen_server_is_left_out_and_its_call_goes_to_the_other(tmp_path: Path) -> None:
    """A server process stopped (SIGSTOP: its connections stay open, nothing answers) is
    found by its unanswered ping; the call it held goes to the other server, and every
    later call is answered there."""
    processes, targets = [], []
    try:
        for n in range(2):
            process = subprocess.Popen(
                [sys.executable, "-c", SERVE, str(tmp_path / f"s{n}")],
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
            processes.append(process)
            assert process.stdout is not None
            targets.append(f"127.0.0.1:{int(process.stdout.readline())}")
            with FaceGateClient(targets[-1], timeout=30) as one:
                one.enroll("m-1", [FRAME])
        with (
            FaceGateClient(",".join(targets), identify_timeout=10) as client,
            Turnstile(client) as turnstile,
        ):
            wait_calls(turnstile, 20)
            processes[0].send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            wait_calls(turnstile, 40)
        after = [c for c in turnstile.calls if c[0] >= stopped]
        assert len(after) >= 40
        assert all(outcome == "DECISION_GRANTED" for _, _, outcome in after), after
        slowest = max(ended - started for started, ended, _ in after)
        assert slowest < 10  # the held call was answered, not left to its deadline
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait(timeout=10)
            assert process.stdout is not None
            process.stdout.close()


class Refusing(pb_grpc.FaceGateServiceServicer):
    """A server that answers UNAVAILABLE (its engines are down) and counts the calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _refuse(self, name: str, context: grpc.ServicerContext) -> Any:
        self.calls[name] = self.calls.get(name, 0) + 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "recognition unavailable")

    def Identify(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse("Identify", context)

    def Verify(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse("Verify", context)

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._refuse("Enroll", context)


class Answering(Refusing):
    def Identify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls["Identify"] = self.calls.get("Identify", 0) + 1
        return pb.IdentifyResponse(decision=pb.DECISION_GRANTED, member_id="m-1")

    def Verify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.calls["Verify"] = self.calls.get("Verify", 0) + 1
        return pb.VerifyResponse(decision=pb.DECISION_GRANTED)


def test_identify_and_verify_are_retried_once_on_the_other_server() -> None:
    refusing, answering = Refusing(), Answering()
    with (
        serving(refusing) as first,
        serving(answering) as second,
        FaceGateClient(f"{first},{second}", identify_timeout=5) as client,
    ):
        # A new client's first calls may go out before its connection to the second
        # server is up (round_robin picks among the connected): then both attempts hit
        # the first. Once both have been reached, a retry always finds the other.
        deadline = time.monotonic() + 30
        while not (refusing.calls and answering.calls):
            assert time.monotonic() < deadline, "the client never reached both servers"
            with contextlib.suppress(FaceGateError):
                client.identify(FRAME, "gate-1")
        refusing.calls.clear()
        answering.calls.clear()
        for _ in range(10):
            assert client.identify(FRAME, "gate-1").decision == pb.DECISION_GRANTED
            assert client.verify("m-1", FRAME, "gate-1").decision == pb.DECISION_GRANTED
        assert refusing.calls["Identify"] >= 1  # round_robin sent it some first attempts
        assert answering.calls["Identify"] == 10 and answering.calls["Verify"] == 10
        assert refusing.calls["Identify"] + answering.calls["Identify"] <= 20
        # An enrolment is not retried: it may have been made.
        refusing.calls.clear()
        answering.calls.clear()
        failures = 0
        for _ in range(4):
            try:
                client.enroll("m-2", [FRAME])
            except FaceGateError:
                failures += 1
        tried = refusing.calls.get("Enroll", 0) + answering.calls.get("Enroll", 0)
        assert failures == tried == 4  # each tried once (both servers refuse enrolments)


def test_identify_is_tried_twice_at_most() -> None:
    first, second = Refusing(), Refusing()
    with (
        serving(first) as one,
        serving(second) as two,
        FaceGateClient(f"ipv4:{one},{two}", identify_timeout=5) as client,
    ):
        with pytest.raises(FaceGateError):
            client.identify(FRAME, "gate-1")
        # Twice in all (on both servers once both are connected: round_robin).
        assert first.calls.get("Identify", 0) + second.calls.get("Identify", 0) == 2


def test_server_lists_become_grpc_address_lists() -> None:
    assert channel_target("10.0.0.5:50051") == "10.0.0.5:50051"
    assert channel_target("10.0.0.5:50051, 10.0.0.6:50051") == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert channel_target("[fd00::5]:50051,[fd00::6]:50051") == (
        "ipv6:[fd00::5]:50051,[fd00::6]:50051"
    )
    assert channel_target("ipv4:10.0.0.5:1,10.0.0.6:1") == "ipv4:10.0.0.5:1,10.0.0.6:1"
    assert channel_target("dns:///gate.example:50051") == "dns:///gate.example:50051"
    with pytest.raises(ValueError, match="DNS name"):
        channel_target("gate-a:50051,gate-b:50051")
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        channel_target("10.0.0.5:50051,[fd00::6]:50051")
    with pytest.raises(ValueError, match="no port"):
        channel_target("10.0.0.5,10.0.0.6")
    with pytest.raises(ValueError, match="TLS"):
        FaceGateClient("10.0.0.5:50051", server_name="gate.example")


def test_a_killed_server_process_leaves_every_later_call_answered(
    tmp_path: Path, faces: Faces
) -> None:
    """Two `facegate serve` processes (the real engine), the same member enrolled in both;
    one is killed (SIGKILL): every call after is answered by the other."""
    photo = faces.read(faces.of("barack_obama")[0])
    frame = faces.read(faces.of("barack_obama")[1])
    processes, targets = [], []
    try:
        for n in range(2):
            settings = {"FACEGATE_DATA_DIR": str(tmp_path / f"s{n}"), "FACEGATE_WORKERS": "1"}
            process, target = start_serve(settings, tmp_path / f"s{n}.log")
            processes.append(process)
            targets.append(target)
            with FaceGateClient(target, timeout=60) as one:
                one.enroll("m-obama", [photo])
        with FaceGateClient(",".join(targets), identify_timeout=10) as client:
            for _ in range(6):
                assert client.identify(frame, "gate-1").decision == pb.DECISION_GRANTED
            processes[0].send_signal(signal.SIGKILL)
            processes[0].wait(timeout=10)
            killed = time.monotonic()
            answered = [client.identify(frame, "gate-1").decision for _ in range(10)]
            assert answered == [pb.DECISION_GRANTED] * 10
            assert time.monotonic() - killed < 60
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def test_the_command_takes_several_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with two_servers(tmp_path) as (servers, _):
        frame = tmp_path / "frame.png"
        frame.write_bytes(FRAME)
        target = f"127.0.0.1:{servers[0].port},127.0.0.1:{servers[1].port}"
        for _ in range(4):
            code = cli.main(["identify", str(frame), "--turnstile-id", "g", "--target", target])
            out, err = capsys.readouterr()
            assert code == 0 and "GRANTED" in out, (out, err)
        assert events(servers[0]) + events(servers[1]) == 4
    code = cli.main(["identify", str(frame), "--turnstile-id", "g", "--target", "a:1,b:2"])
    assert code == 2 and "DNS name" in capsys.readouterr().err
    code = cli.main(["members", "list", "--target", "127.0.0.1:1", "--server-name", "gate.example"])
    assert code == 2 and "TLS" in capsys.readouterr().err
