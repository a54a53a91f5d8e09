"""Callers, roles and rate limits as plain code (the servers are in test_security.py)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from facegate_server.commands.token import new_token
from facegate_server.config import load_settings
from facegate_server.errors import PermissionDenied, RateLimited, Unauthenticated
from facegate_server.rpc import auth, ratelimit
from facegate_server.rpc.auth import Caller, Role, SecurityConfigError
from facegate_server.rpc.status import code_of, to_status
from google.rpc import error_details_pb2, status_pb2

TURNSTILE_TOKEN, BACKEND_TOKEN, ADMIN_TOKEN = new_token(), new_token(), new_token()
CALLERS_TEXT = f"""
# role     name   credential
turnstile  gate-1 {auth.token_hash(TURNSTILE_TOKEN)}
backend    crm    {auth.token_hash(BACKEND_TOKEN)}   # the gym's backend
admin      ops    {auth.token_hash(ADMIN_TOKEN)}; admin ops-laptop cert:ops-laptop
"""
FACEGATE = "/facegate.v1.FaceGateService/"
NO_CONTEXT: dict[str, list[bytes]] = {}


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def guard() -> auth.Authenticator:
    entries = auth.parse_callers(CALLERS_TEXT, "tokens.txt")
    return auth.Authenticator(auth.build_callers(entries))


def test_tokens_are_random_prefixed_and_stored_only_as_sha256() -> None:
    token = new_token()
    assert re.fullmatch(r"fg_[A-Za-z0-9_-]{43}", token)
    assert new_token() != token
    credential = auth.token_hash(token)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", credential)
    assert token not in credential


def test_the_callers_table(guard: auth.Authenticator) -> None:
    callers = guard.callers
    assert len(callers) == 4 and not callers.open
    assert callers.by_token(TURNSTILE_TOKEN) == Caller("gate-1", Role.TURNSTILE, "token")
    assert callers.by_token(ADMIN_TOKEN) == Caller("ops", Role.ADMIN, "token")
    assert callers.by_token(TURNSTILE_TOKEN + "x") is None
    assert callers.by_token(auth.token_hash(TURNSTILE_TOKEN)) is None  # the hash is no token
    assert callers.by_certificate("ops-laptop") == Caller("ops-laptop", Role.ADMIN, "certificate")
    assert callers.by_certificate("gate-1") is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("turnstile gate-1", "ROLE NAME CREDENTIAL"),
        ("root gate-1 sha256:" + "0" * 64, "role must be one of turnstile, backend, admin"),
        ("turnstile gate 1 sha256:" + "0" * 64, "ROLE NAME CREDENTIAL"),
        ("turnstile gåte sha256:" + "0" * 64, "name must be"),
        ("turnstile gate-1 sha256:" + "0" * 63, "credential must be"),
        ("turnstile gate-1 sha256:" + "A" * 64, "credential must be"),
        ("turnstile gate-1 cert:", "credential must be"),
    ],
)
def test_bad_lines_are_refused_naming_the_line(text: str, words: str) -> None:
    with pytest.raises(SecurityConfigError) as error:
        auth.parse_callers("# callers\n\n" + text, "tokens.txt")
    assert "tokens.txt, line 3" in str(error.value)
    assert words in str(error.value)


def test_a_token_pasted_instead_of_its_hash_is_never_quoted() -> None:
    token = new_token()
    with pytest.raises(SecurityConfigError) as error:
        auth.parse_callers(f"backend crm {token}", "FACEGATE_TOKENS")
    assert token not in str(error.value)
    assert "facegate token new" in str(error.value)


def test_duplicates_and_conflicting_roles_are_refused() -> None:
    line = f"backend crm {auth.token_hash(BACKEND_TOKEN)}"
    for text in (
        f"{line}\n{line}",
        f"{line}\nadmin crm {auth.token_hash(ADMIN_TOKEN)}",
        "admin a cert:x\nadmin b cert:x",
    ):
        with pytest.raises(SecurityConfigError):
            auth.build_callers(auth.parse_callers(text, "t"))


def test_a_token_can_be_rotated_with_two_lines_for_one_caller() -> None:
    old, new = new_token(), new_token()
    text = f"turnstile gate-1 {auth.token_hash(old)}\nturnstile gate-1 {auth.token_hash(new)}"
    callers = auth.build_callers(auth.parse_callers(text, "t"))
    assert (
        callers.by_token(old) == callers.by_token(new) == Caller("gate-1", Role.TURNSTILE, "token")
    )


def test_callers_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(f"backend crm {auth.token_hash(BACKEND_TOKEN)}\n")
    settings = load_settings(
        {
            "FACEGATE_TOKENS_FILE": str(tokens_file),
            "FACEGATE_TOKENS": f"turnstile gate-1 {auth.token_hash(TURNSTILE_TOKEN)}",
        }
    )
    assert settings.tokens_file == tokens_file
    assert "sha256" not in repr(settings)
    callers = auth.load_callers(settings.tokens_file, settings.tokens, client_ca=False)
    assert {c.name for _, c in callers.tokens} == {"crm", "gate-1"}
    with pytest.raises(SecurityConfigError, match="FACEGATE_TLS_CLIENT_CA"):
        auth.load_callers(None, "admin ops cert:ops", client_ca=False)
    assert auth.load_callers(None, "", client_ca=False).open


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:0", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/run/facegate.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("192.168.1.20:50051", False),
        ("gate-server:50051", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert auth.is_loopback(listen) is loopback


def test_an_open_server_is_allowed_on_loopback_only_unless_insecure() -> None:
    nobody = auth.Callers()
    warning = auth.check_exposure("127.0.0.1:50051", nobody, insecure=False)
    assert warning and "open" in warning and "loopback" in warning
    with pytest.raises(SecurityConfigError, match="--insecure"):
        auth.check_exposure("0.0.0.0:50051", nobody, insecure=False)
    assert "--insecure" in (auth.check_exposure("0.0.0.0:50051", nobody, insecure=True) or "")
    somebody = auth.build_callers(auth.parse_callers(CALLERS_TEXT, "t"))
    assert auth.check_exposure("0.0.0.0:50051", somebody, insecure=False) is None


# Every FaceGate method (and two that do not exist yet), and who may call it.
ROLE_TABLE = {
    "Identify": {Role.TURNSTILE, Role.BACKEND, Role.ADMIN},
    "Verify": {Role.TURNSTILE, Role.BACKEND, Role.ADMIN},
    "Enroll": {Role.BACKEND, Role.ADMIN},
    "AddMemberPhotos": {Role.BACKEND, Role.ADMIN},
    "GetMember": {Role.BACKEND, Role.ADMIN},
    "UpdateMember": {Role.BACKEND, Role.ADMIN},
    "ListMemberPhotos": {Role.BACKEND, Role.ADMIN},
    "RemoveMemberPhoto": {Role.BACKEND, Role.ADMIN},
    "ListMembers": {Role.BACKEND, Role.ADMIN},
    "DeleteMember": {Role.BACKEND, Role.ADMIN},
    "ListAccessEvents": {Role.BACKEND, Role.ADMIN},
    "GetStatus": {Role.ADMIN},
    "SyncCloud": {Role.ADMIN},
    "SomethingAddedLater": {Role.ADMIN},
}
TOKEN_OF = {Role.TURNSTILE: TURNSTILE_TOKEN, Role.BACKEND: BACKEND_TOKEN, Role.ADMIN: ADMIN_TOKEN}


@pytest.mark.parametrize("method", sorted(ROLE_TABLE))
def test_roles(guard: auth.Authenticator, method: str) -> None:
    for role, token in TOKEN_OF.items():
        if role in ROLE_TABLE[method]:
            caller = guard.admit(FACEGATE + method, bearer(token), NO_CONTEXT)
            assert caller is not None and caller.role is role
        else:
            with pytest.raises(PermissionDenied) as denied:
                guard.admit(FACEGATE + method, bearer(token), NO_CONTEXT)
            assert denied.value.metadata == {"role": role.value, "method": method}
            assert token not in denied.value.message


def test_health_needs_no_credentials_and_reflection_any_role(guard: auth.Authenticator) -> None:
    assert guard.admit("/grpc.health.v1.Health/Check", [], NO_CONTEXT) is None
    assert guard.admit("/grpc.health.v1.Health/Watch", [], NO_CONTEXT) is None
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    with pytest.raises(Unauthenticated):
        guard.admit(reflection, [], NO_CONTEXT)
    assert guard.admit(reflection, bearer(TURNSTILE_TOKEN), NO_CONTEXT) is not None
    with pytest.raises(Unauthenticated):  # no such service: still no way in without a token
        guard.admit("/other.Service/Method", [], NO_CONTEXT)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "CREDENTIALS_MISSING"),
        ([("x-token", TURNSTILE_TOKEN)], "CREDENTIALS_MISSING"),
        (bearer("fg_not-a-token-of-ours"), "TOKEN_INVALID"),
        ([("authorization", TURNSTILE_TOKEN)], "TOKEN_INVALID"),
        ([("authorization", "Basic dXNlcjpwYXNz")], "TOKEN_INVALID"),
        ([("authorization", "Bearer ")], "TOKEN_INVALID"),
        (bearer(TURNSTILE_TOKEN) + bearer(ADMIN_TOKEN), "TOKEN_INVALID"),
    ],
)
def test_missing_and_bad_tokens_are_unauthenticated(
    guard: auth.Authenticator, metadata: list[tuple[str, str]], reason: str
) -> None:
    with pytest.raises(Unauthenticated) as error:
        guard.admit(FACEGATE + "Identify", metadata, NO_CONTEXT)
    assert error.value.reason == reason
    assert code_of(error.value) is grpc.StatusCode.UNAUTHENTICATED
    for secret in (TURNSTILE_TOKEN, ADMIN_TOKEN, "fg_not-a-token-of-ours", "dXNlcjpwYXNz"):
        assert secret not in error.value.message


def test_the_scheme_is_case_insensitive(guard: auth.Authenticator) -> None:
    caller = guard.admit(FACEGATE + "Identify", [("authorization", f"bearer {BACKEND_TOKEN}")], {})
    assert caller == Caller("crm", Role.BACKEND, "token")


def test_certificates_name_callers_and_a_token_wins(guard: auth.Authenticator) -> None:
    ops_laptop = {"x509_common_name": [b"ops-laptop"]}
    assert guard.admit(FACEGATE + "SyncCloud", [], ops_laptop) == Caller(
        "ops-laptop", Role.ADMIN, "certificate"
    )
    with pytest.raises(PermissionDenied):  # the token decides, not the admin certificate
        guard.admit(FACEGATE + "SyncCloud", bearer(TURNSTILE_TOKEN), ops_laptop)
    with pytest.raises(Unauthenticated) as unknown:
        guard.admit(FACEGATE + "Identify", [], {"x509_common_name": [b"stranger"]})
    assert unknown.value.reason == "CERTIFICATE_UNKNOWN"
    stranger_with_token = guard.admit(
        FACEGATE + "Identify", bearer(TURNSTILE_TOKEN), {"x509_common_name": [b"stranger"]}
    )
    assert stranger_with_token == Caller("gate-1", Role.TURNSTILE, "token")


def test_an_open_server_admits_everybody_as_anonymous_admin() -> None:
    guard = auth.Authenticator(auth.Callers())
    for method in ROLE_TABLE:
        assert guard.admit(FACEGATE + method, [], NO_CONTEXT) == auth.OPEN_CALLER
    assert auth.OPEN_CALLER.log_fields() == {
        "caller": "anonymous",
        "role": "admin",
        "auth": "open",
    }


# ------------------------------------------------------------------ rate limits


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    limit = ratelimit.Limit("identify", rate=2.0, burst=3)
    limiter = ratelimit.RateLimiter({FACEGATE + "Identify": limit}, clock=clock)
    assert [limiter.take(limit, "gate-1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(limit, "gate-1") == pytest.approx(0.5)
    assert limiter.take(limit, "gate-1") == pytest.approx(0.5)  # refusals take nothing
    assert limiter.take(limit, "gate-2") == 0.0  # every caller has its own bucket
    clock.now += 0.25
    assert limiter.take(limit, "gate-1") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take(limit, "gate-1") == 0.0
    assert limiter.take(limit, "gate-1") == pytest.approx(0.5)
    clock.now += 3600
    assert [limiter.take(limit, "gate-1") for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_identify_and_enrolment_have_separate_buckets() -> None:
    limits = ratelimit.method_limits(5.0, 10, 1.0, 2)
    assert set(limits) == {
        FACEGATE + m for m in ("Identify", "Verify", "Enroll", "AddMemberPhotos")
    }
    assert limits[FACEGATE + "Enroll"] is limits[FACEGATE + "AddMemberPhotos"]
    assert limits[FACEGATE + "Verify"] is limits[FACEGATE + "Identify"]  # one camera's bucket
    assert limits[FACEGATE + "Identify"] == ratelimit.Limit("identify", 5.0, 10)
    assert set(ratelimit.method_limits(0, 10, 1.0, 2)) == {
        FACEGATE + "Enroll",
        FACEGATE + "AddMemberPhotos",
    }
    assert ratelimit.method_limits(0, 1, 0, 1) == {}


def test_many_callers_do_not_grow_the_buckets_without_bound() -> None:
    clock = FakeClock()
    limit = ratelimit.Limit("identify", rate=1.0, burst=1)
    limiter = ratelimit.RateLimiter({FACEGATE + "Identify": limit}, clock=clock, max_keys=100)
    for i in range(1000):
        limiter.take(limit, f"peer-{i}")
        clock.now += 1.0
    assert len(limiter._buckets) <= 101


def test_rate_limited_is_resource_exhausted_with_retry_info() -> None:
    status = to_status(RateLimited("slow down", retry_delay=0.2501, metadata={"limit": "x"}))
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    rich = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert rich.details[0].Unpack(info) and rich.details[1].Unpack(retry)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "RATE_LIMITED",
        "facegate.v1",
        {"limit": "x"},
    )
    assert retry.retry_delay.ToMilliseconds() == 251


def test_rate_settings() -> None:
    settings = load_settings({"FACEGATE_IDENTIFY_RATE": "2.5", "FACEGATE_ENROLL_BURST": "3"})
    assert (settings.identify_rate, settings.enroll_burst) == (2.5, 3)
    for env in ({"FACEGATE_IDENTIFY_RATE": "-1"}, {"FACEGATE_ENROLL_BURST": "0"}):
        with pytest.raises(ValueError):
            load_settings(env)
    assert load_settings({"FACEGATE_INSECURE": "1"}).insecure is False  # a flag, never env


def test_facegate_token_new_prints_a_token_and_its_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from facegate_client.cli import main

    assert main(["token", "new", "--role", "turnstile", "--name", "gate-1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    [token, line] = lines
    callers = auth.build_callers(auth.parse_callers(line, "printed"))
    assert callers.by_token(token) == Caller("gate-1", Role.TURNSTILE, "token")
    assert token not in line
    assert main(["token", "new", "--role", "root", "--name", "x"]) == 2
    assert main(["token", "new", "--role", "admin", "--name", "two words"]) == 2
