"""`FaceGateClient`: typed, deadline-bound calls to a FaceGate server.

    with FaceGateClient("gate-server:50051") as client:
        result = client.identify(frame, turnstile_id="gate-1")
        if result.decision == pb.DECISION_GRANTED:
            open_gate()

Every call has a deadline (`identify_timeout` for Identify and Verify, `timeout` for the
rest) and
raises a `facegate_client.errors.FaceGateError` subclass when it fails. The idempotent
reads (GetMember, ListMembers, ListAccessEvents) are retried on UNAVAILABLE by gRPC
itself, following the channel's service config; Identify and Verify are retried once (a
person is waiting, and with several servers the retry goes to another one); nothing else
is retried. `follow_events` follows the access log live and reconnects, after the last
event it yielded, when the server goes away.

Several servers (replicas for one gym): a target may name several, as gRPC's address
lists (`ipv4:10.0.0.5:50051,10.0.0.6:50051`, `ipv6:[fd00::5]:50051,[fd00::6]:50051`), a
plain list of IP addresses (`10.0.0.5:50051,10.0.0.6:50051`, made one of those), or a DNS
name with several records (`dns:///gate.example:50051`). Calls are spread over them
(`round_robin`); one that stops is left out as soon as its connection breaks, and the
Identify or Verify that failed with it (UNAVAILABLE) is sent to another. With TLS,
`server_name` is the name the servers' certificates carry, when the target is addresses.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from facegate_client.errors import (
    DeadlineExceeded,
    FaceGateError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_TARGET",
    "KEEP",
    "MAX_MESSAGE_BYTES",
    "SERVICE_CONFIG",
    "FaceGateClient",
    "channel_target",
]

DEFAULT_TARGET: Final = "127.0.0.1:50051"

MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""The largest message the client sends or accepts: an Enroll may carry 10 photos of 6 MiB."""

_SERVICE: Final = pb.DESCRIPTOR.services_by_name["FaceGateService"].full_name
_RETRIED_METHODS: Final = ("GetMember", "ListMembers", "ListAccessEvents", "ListMemberPhotos")
_RETRIED_ONCE: Final = ("Identify", "Verify")
"""A person is waiting: one more attempt, at once (round_robin sends it to the next server).
A frame may be decided twice (two access events) when the server that had it died before
answering; it is never answered twice."""

SERVICE_CONFIG: Final = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": _SERVICE, "method": method} for method in _RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {
                "name": [{"service": _SERVICE, "method": method} for method in _RETRIED_ONCE],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.01s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
        ],
    }
)
"""gRPC service config: calls spread over every address the target resolves to
(`round_robin`); the idempotent reads retried on UNAVAILABLE, Identify and Verify once."""

KEEPALIVE_MS: Final = 500
"""How often the client pings each server it is connected to, and how long it waits for
the answer (FaceGate servers accept a ping every 250 ms: rpc/server.py's PING_OPTIONS)."""

CHANNEL_OPTIONS: Final[tuple[tuple[str, int | str], ...]] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    # A server that stops without closing its connections (frozen, or cut off) is found
    # by a ping unanswered for KEEPALIVE_MS, then left out: the calls it held fail with
    # UNAVAILABLE, and Identify and Verify go to another server within their deadline.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A server restarted (or a second one back) is tried again within 2 s, not after
    # gRPC's default back-off of up to 120 s; and each client keeps its own connections
    # (a new client never inherits another's back-off through the shared subchannel pool).
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),
)
"""The options of the channels `FaceGateClient` creates; use them for a channel of your own."""

_R = TypeVar("_R")

_SCHEMES: Final = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:")


def channel_target(target: str) -> str:
    """The gRPC target for `target`: as it is, except a comma-separated list of IP
    addresses with ports, which becomes gRPC's `ipv4:` or `ipv6:` address list. ValueError
    for a list gRPC cannot take (host names, or both families)."""
    target = target.strip()
    if "," not in target or target.startswith(_SCHEMES):
        return target
    families = set()
    for item in target.split(","):
        if ":" not in item:
            raise ValueError(f"{item.strip()!r} in a list of servers has no port")
        host, _, port = item.strip().rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{item.strip()!r} in a list of servers is not IP:PORT; for servers known"
                " by name, give one DNS name with a record for each (dns:///NAME:PORT)"
            ) from None
        if not port.isdigit():
            raise ValueError(f"{item.strip()!r} in a list of servers has no port")
    if len(families) > 1:
        raise ValueError(
            "a list of servers must be all IPv4 or all IPv6 (or one DNS name with both)"
        )
    scheme = "ipv6:" if families == {6} else "ipv4:"
    return scheme + ",".join(item.strip() for item in target.split(","))


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP: Final = _Keep.KEEP
"""`update_member`'s default for every field: leave it as it is (None clears a time)."""


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    timestamp = Timestamp()
    timestamp.FromDatetime(value)  # a naive datetime is taken as UTC
    return timestamp


def _photo_list(photos: Sequence[bytes]) -> list[bytes]:
    if isinstance(photos, bytes | bytearray | memoryview):
        raise TypeError("photos must be a sequence of photos (bytes), not a single photo")
    return [bytes(photo) for photo in photos]


def _authorization(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries `token` (the token itself is never put in an error)."""
    if token is None:
        return ()
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("a token must be non-empty printable ASCII without spaces")
    return (("authorization", f"Bearer {token}"),)


class FaceGateClient:
    """A connection to a FaceGate server.

    Args:
        target: the server's HOST:PORT, or several servers (see the module's notes:
            `ipv4:A:PORT,B:PORT`, `A:PORT,B:PORT`, `dns:///NAME:PORT`); ignored when
            `channel` is given.
        timeout: the deadline, in seconds, of every call but those below.
        identify_timeout: the deadline, in seconds, of Identify and Verify (a person is
            waiting).
        enroll_timeout: the deadline, in seconds, of Enroll and AddMemberPhotos: by
            default longer than the server's own limit on their recognition
            (`FACEGATE_ENROLL_TIMEOUT_S`, 60 s), so that the server answers first: ten
            phone-size photos take seconds to encode, more while the server is busy, and
            a client that gave up sooner would not know whether they were stored.
        channel: a channel to use instead of creating one; the client does not close it.
            Create it with `CHANNEL_OPTIONS` to keep the retry policy and message limits.
        credentials: TLS credentials; without them (and without the TLS options below) the
            channel is insecure.
        metadata: sent with every call.
        token: a bearer token, sent as `authorization: Bearer <token>` with every call.
        tls: use TLS, trusting the system's root certificates (implied by the next three).
        root_certificates: PEM of the CA(s) that signed the server's certificate.
        certificate_chain, private_key: PEM of this client's certificate and its key, for a
            server that requires client certificates (mutual TLS). Both or neither.
        server_name: with TLS, the name the servers' certificates carry, checked instead
            of the target's host (for a target of IP addresses).

    Use it as a context manager, or call `close()`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 5.0,
        identify_timeout: float = 2.0,
        enroll_timeout: float = 90.0,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
    ) -> None:
        if timeout <= 0 or identify_timeout <= 0 or enroll_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("pass certificate_chain and private_key together")
        if tls or any(pem is not None for pem in (root_certificates, certificate_chain)):
            if credentials is not None:
                raise ValueError("pass credentials or the TLS options, not both")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        if channel is not None and credentials is not None:
            raise ValueError("pass credentials or a channel, not both")
        self._timeout = timeout
        self._identify_timeout = identify_timeout
        self._enroll_timeout = enroll_timeout
        self._metadata = tuple(metadata) + _authorization(token)
        self._owns_channel = channel is None
        if channel is None:
            target = channel_target(target)
            if credentials is None:
                if server_name:
                    raise ValueError("server_name is for TLS: pass tls or a CA as well")
                channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            else:
                options = CHANNEL_OPTIONS
                if server_name:
                    options += (("grpc.ssl_target_name_override", server_name),)
                channel = grpc.secure_channel(target, credentials, options=options)
        self._channel = channel
        self._stub = pb_grpc.FaceGateServiceStub(channel)

    def close(self) -> None:
        """Close the channel, if the client created it. Calling it twice is harmless."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., _R], request: Any, timeout: float | None) -> _R:
        try:
            return method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=self._metadata or None,
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def identify(
        self, image: bytes, turnstile_id: str, *, timeout: float | None = None
    ) -> pb.IdentifyResponse:
        """Decide whether the person in one camera frame may enter.

        A denial is a result, not an error: check `decision`.
        """
        request = pb.IdentifyRequest(image=image, turnstile_id=turnstile_id)
        response: pb.IdentifyResponse = self._call(
            self._stub.Identify,
            request,
            self._identify_timeout if timeout is None else timeout,
        )
        return response

    def verify(
        self, member_id: str, image: bytes, turnstile_id: str, *, timeout: float | None = None
    ) -> pb.VerifyResponse:
        """Decide whether the person in one camera frame is `member_id` (from a card or QR).

        Identify's deadline applies (a person is waiting). A denial is a result, not an
        error: check `decision` (DECISION_DENIED_NOT_THIS_MEMBER also for an id nobody has).
        """
        request = pb.VerifyRequest(member_id=member_id, image=image, turnstile_id=turnstile_id)
        response: pb.VerifyResponse = self._call(
            self._stub.Verify,
            request,
            self._identify_timeout if timeout is None else timeout,
        )
        return response

    def search_faces(
        self, image: bytes, max_candidates: int = 0, *, timeout: float | None = None
    ) -> pb.SearchFacesResponse:
        """Score a frame against the members without deciding or logging (admin only).

        Returns the closest members (max_candidates 1 to 10; 0 means 2) with confidences
        and distances, the decision the local engine would take, and the face's quality.
        """
        request = pb.SearchFacesRequest(image=image, max_candidates=max_candidates)
        response: pb.SearchFacesResponse = self._call(self._stub.SearchFaces, request, timeout)
        return response

    def enroll(
        self,
        member_id: str,
        photos: Sequence[bytes],
        display_name: str = "",
        *,
        membership: pb.Membership | None = None,
        timeout: float | None = None,
    ) -> pb.Member:
        """Create a member from 1 to 10 photos of one face each (AlreadyExists if taken),
        with their `membership` (none: valid from now on, at any time and site)."""
        request = pb.EnrollRequest(
            member_id=member_id,
            display_name=display_name,
            photos=_photo_list(photos),
            membership=membership,
        )
        response: pb.EnrollResponse = self._call(
            self._stub.Enroll, request, self._enroll_timeout if timeout is None else timeout
        )
        return response.member

    def add_member_photos(
        self, member_id: str, photos: Sequence[bytes], *, timeout: float | None = None
    ) -> pb.Member:
        """Add 1 to 10 photos to an enrolled member (NotFound if there is none)."""
        request = pb.AddMemberPhotosRequest(member_id=member_id, photos=_photo_list(photos))
        response: pb.AddMemberPhotosResponse = self._call(
            self._stub.AddMemberPhotos,
            request,
            self._enroll_timeout if timeout is None else timeout,
        )
        return response.member

    def get_member(self, member_id: str, *, timeout: float | None = None) -> pb.Member:
        """Return one member (NotFound if there is none)."""
        request = pb.GetMemberRequest(member_id=member_id)
        response: pb.GetMemberResponse = self._call(self._stub.GetMember, request, timeout)
        return response.member

    def update_member(
        self,
        member_id: str,
        *,
        display_name: str | _Keep = KEEP,
        valid_from: datetime | _Keep | None = KEEP,
        valid_until: datetime | _Keep | None = KEEP,
        suspended: bool | _Keep = KEEP,
        suspension_reason: str | _Keep = KEEP,
        access_hours: Sequence[pb.AccessWindow] | _Keep = KEEP,
        sites: Sequence[str] | _Keep = KEEP,
        timeout: float | None = None,
    ) -> pb.Member:
        """Change only the fields given (the rest are kept, whatever else changes them).

        A time of None clears it (no start, no end); empty `access_hours` is any time and
        empty `sites` every site; `suspended=False` clears the reason unless one is given.
        Naive datetimes are taken as UTC. NotFound if there is no such member.
        """
        member = pb.Member(member_id=member_id)
        paths: list[str] = []
        if display_name is not KEEP:
            member.display_name = display_name
            paths.append("display_name")
        m = member.membership
        for name, value in (("valid_from", valid_from), ("valid_until", valid_until)):
            if value is not KEEP:
                stamp = _timestamp(value)
                if stamp is not None:
                    getattr(m, name).CopyFrom(stamp)
                paths.append(f"membership.{name}")
        if suspended is not KEEP:
            m.suspended = suspended
            paths.append("membership.suspended")
        if suspension_reason is not KEEP:
            m.suspension_reason = suspension_reason
            paths.append("membership.suspension_reason")
        if access_hours is not KEEP:
            m.access_hours.extend(access_hours)
            paths.append("membership.access_hours")
        if sites is not KEEP:
            if isinstance(sites, str):
                raise TypeError("sites must be a sequence of site ids, not one string")
            m.sites.extend(sites)
            paths.append("membership.sites")
        if not paths:
            raise ValueError("name at least one field to change")
        request = pb.UpdateMemberRequest(member=member, update_mask=FieldMask(paths=paths))
        response: pb.UpdateMemberResponse = self._call(self._stub.UpdateMember, request, timeout)
        return response.member

    def list_member_photos(
        self, member_id: str, *, include_photos: bool = False, timeout: float | None = None
    ) -> list[pb.MemberPhoto]:
        """A member's photos: ids, when added, quality measurements (and, with
        `include_photos`, the bytes, where the server keeps photos)."""
        request = pb.ListMemberPhotosRequest(member_id=member_id, include_photos=include_photos)
        response: pb.ListMemberPhotosResponse = self._call(
            self._stub.ListMemberPhotos, request, timeout
        )
        return list(response.photos)

    def remove_member_photo(
        self, member_id: str, photo_id: int, *, timeout: float | None = None
    ) -> pb.Member:
        """Remove one photo of a member (FailedPrecondition for their last one)."""
        request = pb.RemoveMemberPhotoRequest(member_id=member_id, photo_id=photo_id)
        response: pb.RemoveMemberPhotoResponse = self._call(
            self._stub.RemoveMemberPhoto, request, timeout
        )
        return response.member

    def list_members(
        self, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> pb.ListMembersResponse:
        """Return one page of members, in member id order (page_size 0: the server's 100)."""
        request = pb.ListMembersRequest(page_size=page_size, page_token=page_token)
        response: pb.ListMembersResponse = self._call(self._stub.ListMembers, request, timeout)
        return response

    def iter_members(
        self, page_size: int = 100, *, timeout: float | None = None
    ) -> Iterator[pb.Member]:
        """Yield every member, fetching page after page (`timeout` applies to each page)."""
        page_token = ""
        while True:
            page = self.list_members(page_size, page_token, timeout=timeout)
            yield from page.members
            page_token = page.next_page_token
            if not page_token:
                return

    def delete_member(self, member_id: str, *, timeout: float | None = None) -> None:
        """Remove a member and all their face templates (NotFound if there is none)."""
        request = pb.DeleteMemberRequest(member_id=member_id)
        _: pb.DeleteMemberResponse = self._call(self._stub.DeleteMember, request, timeout)

    def list_access_events(
        self,
        member_id: str = "",
        turnstile_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        *,
        decisions: Sequence[pb.Decision.ValueType] = (),
        membership_rule: pb.MembershipRule.ValueType = pb.MEMBERSHIP_RULE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> pb.ListAccessEventsResponse:
        """Return one page of the access log, newest first.

        Empty filters match everything; `start_time` is inclusive, `end_time` exclusive,
        and naive datetimes are taken as UTC. `decisions`: only events with one of them;
        `membership_rule`: only those refused by it (e.g. MEMBERSHIP_RULE_EXPIRED).
        """
        request = pb.ListAccessEventsRequest(
            member_id=member_id,
            turnstile_id=turnstile_id,
            start_time=_timestamp(start_time),
            end_time=_timestamp(end_time),
            page_size=page_size,
            page_token=page_token,
            decisions=list(decisions),
            membership_rule=membership_rule,
        )
        response: pb.ListAccessEventsResponse = self._call(
            self._stub.ListAccessEvents, request, timeout
        )
        return response

    def iter_access_events(
        self,
        member_id: str = "",
        turnstile_id: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        page_size: int = 100,
        *,
        decisions: Sequence[pb.Decision.ValueType] = (),
        membership_rule: pb.MembershipRule.ValueType = pb.MEMBERSHIP_RULE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> Iterator[pb.AccessEvent]:
        """Yield every matching access event, newest first, page after page."""
        page_token = ""
        while True:
            page = self.list_access_events(
                member_id,
                turnstile_id,
                start_time,
                end_time,
                page_size,
                page_token,
                decisions=decisions,
                membership_rule=membership_rule,
                timeout=timeout,
            )
            yield from page.events
            page_token = page.next_page_token
            if not page_token:
                return

    def watch_events(
        self,
        after_event_id: int = 0,
        member_id: str = "",
        turnstile_id: str = "",
        *,
        decisions: Sequence[pb.Decision.ValueType] = (),
        membership_rule: pb.MembershipRule.ValueType = pb.MEMBERSHIP_RULE_UNSPECIFIED,
        timeout: float | None = None,
    ) -> Iterator[pb.AccessEvent]:
        """Follow the access log (WatchAccessEvents): every event with an id greater than
        `after_event_id`, oldest first, then each new one as it is written, for as long as
        you iterate. No deadline unless `timeout` is given (a follower stays).

        The stream ends with a `FaceGateError` when the connection or the server goes
        (`Unavailable`, reason SERVER_STOPPING when it stops): call again with the last
        `event_id` you got and nothing is lost or repeated; `follow_events` does that.
        Closing the iterator cancels the call.
        """
        request = pb.WatchAccessEventsRequest(
            after_event_id=after_event_id,
            member_id=member_id,
            turnstile_id=turnstile_id,
            decisions=list(decisions),
            membership_rule=membership_rule,
        )
        call = self._stub.WatchAccessEvents(
            request, timeout=timeout, metadata=self._metadata or None
        )
        try:
            for response in call:
                yield response.event
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    def follow_events(
        self,
        after_event_id: int | None = 0,
        member_id: str = "",
        turnstile_id: str = "",
        *,
        decisions: Sequence[pb.Decision.ValueType] = (),
        membership_rule: pb.MembershipRule.ValueType = pb.MEMBERSHIP_RULE_UNSPECIFIED,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        on_reconnect: Callable[[FaceGateError, float], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        tail: int = 10,
    ) -> Iterator[pb.AccessEvent]:
        """`watch_events` that survives restarts: when the stream ends UNAVAILABLE (the
        server stopping, restarting, out of reach), it waits and reconnects with the last
        event id it yielded, so each event is yielded once, none lost. It waits `backoff`
        seconds, doubling up to `max_backoff` (with a little jitter) while reconnecting
        fails, and from `backoff` again once a stream has delivered an event or lasted.
        RESOURCE_EXHAUSTED (too many followers, or reconnecting too often) is waited out
        likewise, at least as long as its RetryInfo says. `on_reconnect(error, delay)` is
        told of each wait. Other errors (credentials, role, bad filters) end it.
        `after_event_id` None: start with the last `tail` matching events, as `tail -f`
        does (asked of the log as the stream is: again while the server cannot answer).
        """
        last, delay = after_event_id, backoff
        while True:
            began = time.monotonic()
            try:
                if last is None:
                    newest = self.list_access_events(
                        member_id=member_id,
                        turnstile_id=turnstile_id,
                        page_size=tail,
                        decisions=decisions,
                        membership_rule=membership_rule,
                    ).events
                    last = newest[-1].event_id - 1 if newest else 0
                for event in self.watch_events(
                    last,
                    member_id,
                    turnstile_id,
                    decisions=decisions,
                    membership_rule=membership_rule,
                ):
                    if event.event_id <= last:
                        continue  # never yield an event twice
                    last, delay = event.event_id, backoff
                    yield event
                error: FaceGateError = Unavailable("the stream ended")
            except (Unavailable, ResourceExhausted, DeadlineExceeded) as refused:
                error = refused
            if time.monotonic() - began > max_backoff:
                delay = backoff  # it was connected a while: this is a new outage
            wait = delay * random.uniform(0.8, 1.2)
            if isinstance(error, ResourceExhausted) and error.retry_delay is not None:
                wait = max(wait, error.retry_delay)  # over a limit: as long as the server says
            if on_reconnect is not None:
                on_reconnect(error, wait)
            sleep(wait)
            delay = min(max_backoff, delay * 2)

    def get_status(self, *, timeout: float | None = None) -> pb.GetStatusResponse:
        """The server's state: routing policy, the cloud's circuit, outbox depth, counts."""
        response: pb.GetStatusResponse = self._call(
            self._stub.GetStatus, pb.GetStatusRequest(), timeout
        )
        return response

    def sync_cloud(
        self,
        *,
        dry_run: bool = False,
        retry_parked: bool = False,
        report_only: bool = False,
        timeout: float | None = None,
    ) -> pb.SyncCloudResponse:
        """Start a reconciliation of the cloud group with the server's store, or join the
        running one of the same kind. The server runs it in the background and answers at
        once: `running` is the reconciliation started or joined, `finished` the last one
        that finished, `changes` its differences (`wait_for_sync` waits for yours). With
        `report_only`, start nothing; with `retry_parked`, only put the parked outbox
        entries back in line."""
        response: pb.SyncCloudResponse = self._call(
            self._stub.SyncCloud,
            pb.SyncCloudRequest(
                dry_run=dry_run, retry_parked=retry_parked, report_only=report_only
            ),
            timeout,
        )
        return response

    def wait_for_sync(
        self,
        reconciliation_id: int,
        *,
        timeout: float = 600.0,
        every: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> pb.SyncCloudResponse:
        """Ask every `every` seconds (SyncCloud with report_only) until reconciliation
        `reconciliation_id` has finished; the answer whose `finished` it is (or a later
        one's, when another finished in between). TimeoutError after `timeout` seconds,
        saying how far it has gone."""
        deadline = clock() + timeout
        while True:
            response = self.sync_cloud(report_only=True)
            if response.finished.reconciliation_id >= reconciliation_id:
                return response
            if clock() >= deadline:
                progress = response.running
                raise TimeoutError(
                    f"reconciliation {reconciliation_id} still running after {timeout:g} s"
                    f" ({progress.phase}: {progress.persons_checked} cloud persons and"
                    f" {progress.members_checked} members checked"
                    + (f"; {progress.waiting}" if progress.waiting else "")
                    + "); `facegate sync --wait` again waits for it"
                )
            sleep(every)
