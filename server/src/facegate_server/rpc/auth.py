"""Who is calling, and may they: bearer tokens, client certificates, and roles.

Callers are lines `ROLE NAME CREDENTIAL`, in a tokens file (FACEGATE_TOKENS_FILE) and/or
in FACEGATE_TOKENS (entries separated by `;` or newlines); `#` starts a comment:

    # role     name        credential
    turnstile  gate-1      sha256:5f2b...64 hex digits   (a bearer token, by its hash)
    backend    crm         sha256:0c1d...
    admin      ops-laptop  cert:ops-laptop               (a client certificate, CN=ops-laptop)

Tokens are kept only as their SHA-256. They are 256-bit random secrets (`facegate token
new` makes them), so a fast unsalted hash is enough: a token cannot be guessed, and the
hash of one gives nothing away. A presented token is hashed and compared with every
configured hash by `hmac.compare_digest`, all of them each time.

A call is admitted when (in this order):
1. no callers are configured: the server is open (`check_exposure` allows that on a
   loopback address only, or with `facegate serve --insecure`);
2. the method needs no credentials (the health service, for probes and load balancers);
3. the caller's credentials are known (a bearer token decides when one is sent; else the
   client certificate's CN), or UNAUTHENTICATED;
4. the caller's role may call the method (`ALLOWED`; admin may call every method), or
   PERMISSION_DENIED. Methods not in `ALLOWED` are admin-only.

The admitted caller is available to the servicer (`current_caller`) for its log line.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, cast

import grpc

from facegate_server.errors import FaceGateError, PermissionDenied, Unauthenticated
from facegate_server.rpc.intercept import Refusals, guard_behaviour, method_name, refuse

log = logging.getLogger(__name__)


class Role(StrEnum):
    TURNSTILE = "turnstile"
    """A gate's camera: Identify and Verify only."""
    BACKEND = "backend"
    """The gym's backend: members, enrolment, the access log, Identify and Verify."""
    ADMIN = "admin"
    """Operators: every method (status, sync, ...)."""


_FACEGATE = "/facegate.v1.FaceGateService/"
_BACKEND: Final = frozenset({Role.BACKEND})
_ANY_ROLE: Final = frozenset(Role)

ALLOWED: Final[Mapping[str, frozenset[Role]]] = {
    _FACEGATE + "Identify": frozenset({Role.TURNSTILE, Role.BACKEND}),
    _FACEGATE + "Verify": frozenset({Role.TURNSTILE, Role.BACKEND}),
    _FACEGATE + "Enroll": _BACKEND,
    _FACEGATE + "AddMemberPhotos": _BACKEND,
    _FACEGATE + "GetMember": _BACKEND,
    _FACEGATE + "UpdateMember": _BACKEND,
    _FACEGATE + "ListMemberPhotos": _BACKEND,
    _FACEGATE + "RemoveMemberPhoto": _BACKEND,
    _FACEGATE + "ListMembers": _BACKEND,
    _FACEGATE + "DeleteMember": _BACKEND,
    _FACEGATE + "ListAccessEvents": _BACKEND,
    # Reflection shows only the public contract, but to known callers only (grpcurl -H).
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY_ROLE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _ANY_ROLE,
}
"""The roles, besides admin, that may call each method. One line a method; a method
missing here is admin-only."""

NO_CREDENTIALS_NEEDED: Final = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}
)
"""Health answers SERVING or NOT_SERVING and nothing else: probes call it without tokens
(with mTLS they still need a client certificate to connect at all)."""


def allowed(role: Role, full_method: str) -> bool:
    return role is Role.ADMIN or role in ALLOWED.get(full_method, frozenset())


@dataclass(frozen=True)
class Caller:
    """An admitted caller: `name` from the tokens file, `via` token, certificate or open."""

    name: str
    role: Role
    via: str

    def log_fields(self) -> dict[str, str]:
        return {"caller": self.name, "role": self.role.value, "auth": self.via}


OPEN_CALLER: Final = Caller("anonymous", Role.ADMIN, "open")
"""Every caller of a server without configured callers."""

_current: ContextVar[Caller | None] = ContextVar("facegate_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC this thread is serving (None outside an admitted call)."""
    return _current.get()


@contextmanager
def calling_as(caller: Caller | None) -> Iterator[None]:
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


class SecurityConfigError(RuntimeError):
    """The callers, TLS files or listen address make an unsafe or unusable server."""


# ------------------------------------------------------------------ the callers table

NAME = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
TOKEN_PREFIX: Final = "fg_"


def token_hash(token: str) -> str:
    """The credential of a token, as written in the tokens file: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Callers:
    """The configured callers: token hashes and certificate CNs, each with a Caller."""

    tokens: tuple[tuple[bytes, Caller], ...] = ()
    certificates: Mapping[str, Caller] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return not self.tokens and not self.certificates

    def __len__(self) -> int:
        return len(self.tokens) + len(self.certificates)

    def by_token(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for known, caller in self.tokens:  # every hash, every time: no early exit
            if hmac.compare_digest(known, digest):
                found = caller
        return found

    def by_certificate(self, common_name: str) -> Caller | None:
        return self.certificates.get(common_name)


def parse_callers(text: str, source: str) -> list[tuple[str, Caller]]:
    """(credential, caller) pairs from tokens-file text. Errors name the line, never quote
    a credential (a token pasted by mistake must not reach a log)."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        for entry in raw.split("#", 1)[0].split(";"):
            if entry.strip():
                entries.append(_parse_entry(entry.split(), f"{source}, line {number}"))
    return entries


def _parse_entry(parts: list[str], where: str) -> tuple[str, Caller]:
    if len(parts) != 3:
        raise SecurityConfigError(f"{where}: expected 'ROLE NAME CREDENTIAL'")
    role_text, name, credential = parts
    try:
        role = Role(role_text)
    except ValueError:
        raise SecurityConfigError(
            f"{where}: the role must be one of {', '.join(Role)}, not {role_text[:20]!r}"
        ) from None
    if not NAME.fullmatch(name):
        raise SecurityConfigError(f"{where}: the name must be 1 to 64 letters, digits or . _ : @ -")
    if credential.startswith("cert:") and NAME.fullmatch(credential[5:]):
        return credential, Caller(name, role, "certificate")
    if _SHA256.fullmatch(credential):
        return credential, Caller(name, role, "token")
    raise SecurityConfigError(
        f"{where}: the credential must be sha256:<64 lowercase hex digits> (the hash of a "
        "token, as `facegate token new` prints it) or cert:<client certificate CN>"
    )


def build_callers(entries: Sequence[tuple[str, Caller]]) -> Callers:
    tokens: dict[bytes, Caller] = {}
    certificates: dict[str, Caller] = {}
    roles: dict[str, Role] = {}
    for credential, caller in entries:
        if roles.setdefault(caller.name, caller.role) is not caller.role:
            raise SecurityConfigError(f"caller {caller.name!r} is given two roles")
        if credential.startswith("cert:"):
            if credential[5:] in certificates:
                raise SecurityConfigError(f"certificate CN {credential[5:]!r} is listed twice")
            certificates[credential[5:]] = caller
        else:
            digest = bytes.fromhex(credential.removeprefix("sha256:"))
            if digest in tokens:
                raise SecurityConfigError(f"a token of caller {caller.name!r} is listed twice")
            tokens[digest] = caller
    return Callers(tuple(tokens.items()), certificates)


def load_callers(tokens_file: Path | None, tokens: str, *, client_ca: bool) -> Callers:
    """The callers of the tokens file and of FACEGATE_TOKENS (`tokens`), checked."""
    entries = []
    if tokens_file is not None:
        entries += parse_callers(Path(tokens_file).read_text(encoding="utf-8"), str(tokens_file))
    entries += parse_callers(tokens, "FACEGATE_TOKENS")
    callers = build_callers(entries)
    if callers.certificates and not client_ca:
        raise SecurityConfigError(
            "cert: callers are configured but no client CA (FACEGATE_TLS_CLIENT_CA): "
            "no client certificate would ever be asked for"
        )
    return callers


# ------------------------------------------------------------------ exposure


def is_loopback(listen: str) -> bool:
    """Whether `listen` (gRPC's HOST:PORT, [V6]:PORT or unix:PATH) is reachable only
    from this machine."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rpartition(":")[0] if ":" in listen else listen
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or an empty host: every interface


def check_exposure(listen: str, callers: Callers, *, insecure: bool) -> str | None:
    """Refuse to serve without authentication beyond loopback unless `insecure`; return
    the warning to log when the server will run open."""
    if not callers.open:
        return None
    if is_loopback(listen):
        return (
            "no callers are configured (FACEGATE_TOKENS_FILE, FACEGATE_TOKENS): the server is "
            f"open to every local caller, on the loopback address {listen} only"
        )
    if not insecure:
        raise SecurityConfigError(
            f"refusing to listen on {listen} without authentication: configure callers "
            "(FACEGATE_TOKENS_FILE or FACEGATE_TOKENS; `facegate token new` makes tokens), "
            "listen on a loopback address, or pass --insecure"
        )
    return (
        f"--insecure: no callers are configured and the server listens on {listen}: "
        "anyone who can reach it may enrol, delete and read members"
    )


# ------------------------------------------------------------------ admitting calls

Metadata = Sequence[tuple[str, str | bytes]]


def _bearer(metadata: Metadata) -> str | None:
    """The bearer token sent, None if no authorization header; Unauthenticated if bad."""
    values = [value for key, value in metadata if key.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("send one authorization header", reason="TOKEN_INVALID")
    value = values[0]
    scheme, _, token = (value if isinstance(value, str) else "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(
            "the authorization header must be 'Bearer <token>'", reason="TOKEN_INVALID"
        )
    return token


def _common_name(auth_context: Mapping[str, Any]) -> str | None:
    names = auth_context.get("x509_common_name") or []
    if not names:
        return None
    name = names[0]
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


class Authenticator:
    """Decides whether a call is admitted, and as whom. `callers` is one reference that a
    reload (SIGHUP) replaces whole: each call reads it once, so it sees the old table or the
    new one, never a mix."""

    def __init__(self, callers: Callers) -> None:
        self.callers = callers

    def authenticate(
        self, metadata: Metadata, auth_context: Mapping[str, Any], callers: Callers | None = None
    ) -> Caller:
        callers = self.callers if callers is None else callers
        token = _bearer(metadata)
        if token is not None:
            caller = callers.by_token(token)
            if caller is None:
                raise Unauthenticated("the bearer token is not recognised", reason="TOKEN_INVALID")
            return caller
        common_name = _common_name(auth_context)
        if common_name is not None:
            caller = callers.by_certificate(common_name)
            if caller is None:
                raise Unauthenticated(
                    f"the client certificate (CN={common_name[:64]!r}) is not a configured "
                    "caller; send a bearer token",
                    reason="CERTIFICATE_UNKNOWN",
                )
            return caller
        raise Unauthenticated(
            "this server needs credentials: metadata 'authorization: Bearer <token>'"
            + (" or a known client certificate" if callers.certificates else ""),
            reason="CREDENTIALS_MISSING",
        )

    def identify(
        self, full_method: str, metadata: Metadata, auth_context: Mapping[str, Any]
    ) -> Caller | None:
        """Who calls: None for a method that needs no credentials; Unauthenticated."""
        callers = self.callers  # read once (see the class)
        if callers.open:
            return OPEN_CALLER
        if full_method in NO_CREDENTIALS_NEEDED:
            return None
        return self.authenticate(metadata, auth_context, callers)

    @staticmethod
    def authorize(caller: Caller | None, full_method: str) -> None:
        """PermissionDenied unless `caller` (None: no credentials needed) may call."""
        if caller is not None and not allowed(caller.role, full_method):
            raise PermissionDenied(
                f"{caller.role.value} callers may not call {method_name(full_method)}",
                metadata={"role": caller.role.value, "method": method_name(full_method)},
            )

    def admit(
        self, full_method: str, metadata: Metadata, auth_context: Mapping[str, Any]
    ) -> Caller | None:
        """The caller admitted to `full_method` (None: no credentials needed), or
        Unauthenticated, or PermissionDenied."""
        caller = self.identify(full_method, metadata, auth_context)
        self.authorize(caller, full_method)
        return caller


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits or refuses every call before the servicer sees it (counted; see Refusals)."""

    def __init__(self, authenticator: Authenticator, refusals: Refusals | None = None) -> None:
        self.authenticator = authenticator
        self.refusals = refusals

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED
        full_method = handler_call_details.method
        metadata = cast(Metadata, tuple(handler_call_details.invocation_metadata or ()))
        authenticator, refusals = self.authenticator, self.refusals

        @asynccontextmanager
        async def admitted(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
            started = time.perf_counter()
            caller = None
            try:
                caller = authenticator.identify(full_method, metadata, context.auth_context())
                authenticator.authorize(caller, full_method)
            except FaceGateError as error:
                fields = caller.log_fields() if caller is not None else {}
                await refuse(context, full_method, error, started, refusals, **fields)
            with calling_as(caller):
                yield

        return guard_behaviour(handler, admitted)


def interceptor(callers: Callers, refusals: Refusals | None = None) -> AuthInterceptor:
    return AuthInterceptor(Authenticator(callers), refusals)
