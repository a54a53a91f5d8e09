"""Callers, roles, rate limits and TLS on real servers (port 0, one worker each)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegate.v1 import facegate_service_pb2 as pb
from facegate_client import (
    FaceGateClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from facegate_server.app import build_server
from facegate_server.commands.token import new_token
from facegate_server.config import load_settings
from facegate_server.engines.memory import MemoryEngine
from facegate_server.rpc import auth
from facegate_server.rpc.auth import Role, SecurityConfigError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import FakeClock, running_server
from tests.pki import Authority

TOKENS = {name: new_token() for name in ("gate-1", "crm", "ops", "flood")}
ROLES = {"gate-1": Role.TURNSTILE, "crm": Role.BACKEND, "ops": Role.ADMIN, "flood": Role.TURNSTILE}
CALLERS = "\n".join(f"{ROLES[n]} {n} {auth.token_hash(t)}" for n, t in TOKENS.items())
SERVICE = pb.DESCRIPTOR.services_by_name["FaceGateService"]


def serve(tmp: Path, clock: FakeClock | None = None, **settings: Any) -> Any:
    """A server with callers and rate limits, on the fake engine: these tests recognise
    no faces, so no recognition worker starts."""
    return running_server(tmp, engine=MemoryEngine(), clock=clock or FakeClock(), **settings)


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[str]:
    """A plaintext loopback server with callers: its target."""
    with serve(
        tmp_path_factory.mktemp("guarded"),
        clock,
        tokens=CALLERS,
        identify_rate=2.0,
        identify_burst=5,
        enroll_rate=1.0,
        enroll_burst=5,
    ) as server:
        yield f"127.0.0.1:{server.port}"


def call_raw(channel: grpc.Channel, method: str, token: str | None) -> grpc.StatusCode:
    """Call `method` with an empty request message; the status code answered."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        channel.unary_unary(f"/{SERVICE.full_name}/{method}")(b"", timeout=10, metadata=metadata)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_every_method_admits_exactly_the_roles_of_the_table(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel:
        for method in SERVICE.methods:
            full = f"/{SERVICE.full_name}/{method.name}"
            for name in ("gate-1", "crm", "ops"):
                code = call_raw(channel, method.name, TOKENS[name])
                if auth.allowed(ROLES[name], full):
                    assert code not in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ), (method.name, name)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method.name, name)
            assert call_raw(channel, method.name, None) == grpc.StatusCode.UNAUTHENTICATED
    # The one-line table: only Identify and Verify for turnstiles, the member methods for the
    # backend.
    assert auth.allowed(Role.TURNSTILE, f"/{SERVICE.full_name}/Identify")
    assert auth.allowed(Role.TURNSTILE, f"/{SERVICE.full_name}/Verify")
    assert not auth.allowed(Role.TURNSTILE, f"/{SERVICE.full_name}/ListAccessEvents")
    assert auth.allowed(Role.BACKEND, f"/{SERVICE.full_name}/DeleteMember")


def test_the_client_sends_its_token(guarded: str) -> None:
    with FaceGateClient(guarded, token=TOKENS["crm"]) as backend:
        assert backend.list_members().members == []
        with pytest.raises(NotFound):
            backend.get_member("m-1")
    with FaceGateClient(guarded, token=TOKENS["gate-1"]) as turnstile:
        with pytest.raises(InvalidArgument):
            turnstile.identify(b"", "gate-1")
        with pytest.raises(PermissionDenied) as denied:
            turnstile.delete_member("m-1")
        assert denied.value.reason == "ROLE_NOT_ALLOWED"
        assert denied.value.metadata == {"role": "turnstile", "method": "DeleteMember"}


@pytest.mark.parametrize(
    ("token", "reason"),
    [(None, "CREDENTIALS_MISSING"), ("fg_guessed", "TOKEN_INVALID"), ("x" * 3000, "TOKEN_INVALID")],
)
def test_without_a_known_token_is_unauthenticated(
    guarded: str, token: str | None, reason: str
) -> None:
    with FaceGateClient(guarded, token=token) as stranger, pytest.raises(Unauthenticated) as error:
        stranger.list_members()
    assert error.value.reason == reason
    assert token is None or token not in str(error.value)


def test_health_needs_no_token_reflection_needs_one(guarded: str) -> None:
    with grpc.insecure_channel(guarded) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as error:
            next(iter(reflection.ServerReflectionInfo(iter([request]), timeout=5)))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = next(
            iter(
                reflection.ServerReflectionInfo(
                    iter([request]),
                    timeout=5,
                    metadata=[("authorization", f"Bearer {TOKENS['gate-1']}")],
                )
            )
        )
        names = {s.name for s in answer.list_services_response.service}
        assert SERVICE.full_name in names


def test_rate_limits_per_caller_with_a_retry_delay(guarded: str, clock: FakeClock) -> None:
    with (
        FaceGateClient(guarded, token=TOKENS["flood"]) as flood,
        FaceGateClient(guarded, token=TOKENS["gate-1"]) as neighbour,
    ):
        for _ in range(5):  # the burst (bad requests count: they were served)
            with pytest.raises(InvalidArgument):
                flood.identify(b"", "gate-9")
        with pytest.raises(ResourceExhausted) as limited:
            flood.identify(b"", "gate-9")
        assert limited.value.reason == "RATE_LIMITED"
        assert limited.value.metadata == {"limit": "identify"}
        assert limited.value.retry_delay == pytest.approx(0.5)
        with pytest.raises(InvalidArgument):  # another caller has a bucket of its own
            neighbour.identify(b"", "gate-1")
        clock.now += 0.25
        with pytest.raises(ResourceExhausted) as still:
            flood.identify(b"", "gate-9")
        assert still.value.retry_delay == pytest.approx(0.25)
        clock.now += 0.25
        with pytest.raises(InvalidArgument):
            flood.identify(b"", "gate-9")


def test_refusals_and_management_calls_are_logged_with_the_caller(
    guarded: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="facegate.rpc")
    with FaceGateClient(guarded, token=TOKENS["crm"]) as backend, pytest.raises(NotFound):
        backend.delete_member("m-404")
    with FaceGateClient(guarded, token=TOKENS["gate-1"]) as gate, pytest.raises(PermissionDenied):
        gate.list_members()
    with FaceGateClient(guarded, token="fg_wrong") as stranger, pytest.raises(Unauthenticated):
        stranger.list_members()
    lines = [vars(r) for r in caplog.records if r.name == "facegate.rpc"]
    deleted = next(line for line in lines if line.get("method") == "DeleteMember")
    assert (deleted["caller"], deleted["role"], deleted["auth"]) == ("crm", "backend", "token")
    assert (deleted["code"], deleted["member_id"]) == ("NOT_FOUND", "m-404")
    denied = next(line for line in lines if line.get("code") == "PERMISSION_DENIED")
    assert (denied["caller"], denied["method"]) == ("gate-1", "ListMembers")
    assert denied["peer"].startswith("ipv4:127.0.0.1:")
    unknown = next(line for line in lines if line.get("code") == "UNAUTHENTICATED")
    assert unknown["reason"] == "TOKEN_INVALID" and unknown["peer"].startswith("ipv4:")
    assert "caller" not in unknown
    everything = caplog.text + repr(lines)
    assert not any(token in everything for token in [*TOKENS.values(), "fg_wrong"])


def test_an_open_server_refuses_a_public_address(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="--insecure"):
        build_server(load_settings({}, listen="0.0.0.0:0", data_dir=tmp_path, workers=1))
    with pytest.raises(SecurityConfigError, match="line 1"):
        build_server(load_settings({}, data_dir=tmp_path, workers=1, tokens="admin ops secret"))
    assert not (tmp_path / "facegate.sqlite3").exists()  # refused before anything started


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files of a CA, its server and client certificates, and another CA's client."""
    tmp = tmp_path_factory.mktemp("pki")
    ours, theirs = Authority("FaceGate test CA"), Authority("Some other CA")
    files = {"ca": tmp / "ca.crt", "other-ca": tmp / "other-ca.crt"}
    files["ca"].write_bytes(ours.pem)
    files["other-ca"].write_bytes(theirs.pem)
    files["server.crt"], files["server.key"] = ours.server().write(tmp, "server")
    for name, authority in (("gate-7", ours), ("stranger", ours), ("impostor", theirs)):
        files[f"{name}.crt"], files[f"{name}.key"] = authority.client(
            "gate-7" if name == "impostor" else name
        ).write(tmp, name)
    return files


@pytest.fixture(scope="module")
def mutual(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[str]:
    """A server requiring client certificates of our CA; gate-7's certificate is a caller."""
    with serve(
        tmp_path_factory.mktemp("mutual"),
        tokens=f"{CALLERS}\nturnstile gate-7 cert:gate-7",
        tls_cert=pki["server.crt"],
        tls_key=pki["server.key"],
        tls_client_ca=pki["ca"],
    ) as server:
        yield f"127.0.0.1:{server.port}"


def client(target: str, pki: dict[str, Path], who: str | None, **options: object) -> FaceGateClient:
    pems: dict[str, object] = {"root_certificates": pki["ca"].read_bytes()}
    if who is not None:
        pems["certificate_chain"] = pki[f"{who}.crt"].read_bytes()
        pems["private_key"] = pki[f"{who}.key"].read_bytes()
    return FaceGateClient(target, timeout=5, **{**pems, **options})  # type: ignore[arg-type]


def test_a_client_certificate_names_the_caller(mutual: str, pki: dict[str, Path]) -> None:
    with client(mutual, pki, "gate-7") as gate:
        with pytest.raises(InvalidArgument):
            gate.identify(b"", "gate-7")
        with pytest.raises(PermissionDenied):
            gate.list_members()
    with client(mutual, pki, "stranger") as stranger:
        with pytest.raises(Unauthenticated) as unknown:
            stranger.list_members()
        assert unknown.value.reason == "CERTIFICATE_UNKNOWN"
    with client(mutual, pki, "stranger", token=TOKENS["crm"]) as backend:
        assert backend.list_members().members == []


@pytest.mark.parametrize(
    "how", ["plaintext", "no client certificate", "another CA's certificate", "untrusted server"]
)
def test_mutual_tls_refuses_connections(mutual: str, pki: dict[str, Path], how: str) -> None:
    if how == "plaintext":
        refused = FaceGateClient(mutual, timeout=5, token=TOKENS["ops"])
    elif how == "no client certificate":
        refused = client(mutual, pki, None, token=TOKENS["ops"])
    elif how == "another CA's certificate":
        refused = client(mutual, pki, "impostor")  # CN gate-7, as a known caller's
    else:
        refused = FaceGateClient(
            mutual,
            timeout=5,
            root_certificates=pki["other-ca"].read_bytes(),
            certificate_chain=pki["gate-7.crt"].read_bytes(),
            private_key=pki["gate-7.key"].read_bytes(),
        )
    with refused, pytest.raises(Unavailable):
        refused.identify(b"", "gate-7")


def test_tls_settings_are_checked_before_anything_starts(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    for settings, words in [
        ({"tls_cert": pki["server.crt"]}, "both a certificate and its key"),
        ({"tls_client_ca": pki["ca"]}, "needs the server's certificate"),
        ({"tls_cert": pki["server.crt"], "tls_key": tmp_path / "missing.key"}, "cannot read"),
        ({"tls_cert": pki["server.crt"], "tls_key": tmp_path / "tokens"}, "not PEM"),
    ]:
        (tmp_path / "tokens").write_text("not a key")
        with pytest.raises(SecurityConfigError, match=words) as error:
            build_server(load_settings({}, data_dir=tmp_path / "data", workers=1, **settings))
        assert "BEGIN" not in str(error.value)
    assert not (tmp_path / "data").exists()


def test_the_client_checks_its_options() -> None:
    with pytest.raises(ValueError, match="together"):
        FaceGateClient(certificate_chain=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match="not both"):
        FaceGateClient(tls=True, credentials=grpc.ssl_channel_credentials())
    for bad in ("", "two words", "tab\there", "ünïcode"):
        with pytest.raises(ValueError) as error:
            FaceGateClient(token=bad)
        assert bad not in str(error.value) or not bad
