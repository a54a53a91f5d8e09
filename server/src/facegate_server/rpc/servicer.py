"""The protobuf edge: each RPC validates its message, delegates to the Gate, converts back.

Every RPC logs one structured line (method, caller, status, latency, member, decision;
never image bytes). Domain errors become rich statuses (rpc/status.py); anything else
is logged with its traceback and answered INTERNAL without internals.

The methods are synchronous: the server runs them on its thread pool (rpc/server.py).
Identify's and Verify's budget starts when the call arrived (`arrival()`), not when a
thread took it; the log line says how long the call waited for one (`queued_ms`).
WatchAccessEvents, which lasts as long as its caller stays, is an asyncio generator on the
server's loop instead (feed.py): it holds no thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from facegate.v1 import facegate_service_pb2 as pb
from facegate.v1 import facegate_service_pb2_grpc as pb_grpc

from facegate_server.domain import AccessEvent
from facegate_server.errors import FaceGateError
from facegate_server.feed import EventFeed
from facegate_server.gate import Gate
from facegate_server.rpc import serde
from facegate_server.rpc.auth import current_caller
from facegate_server.rpc.server import arrival, since
from facegate_server.rpc.status import code_of, to_status

log = logging.getLogger("facegate.rpc")


Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.ServicerContext], Response]


def _log_fields(request: Any, response: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("member_id", "turnstile_id"):
        value = getattr(request, name, "")
        if value:
            fields[name] = value[:80]
    if isinstance(request, pb.VerifyRequest) and request.member_id:
        fields["claimed_member_id"] = fields.pop("member_id")
    if isinstance(request, pb.IdentifyRequest | pb.VerifyRequest):
        fields["image_bytes"] = len(request.image)
    if isinstance(request, pb.EnrollRequest | pb.AddMemberPhotosRequest):
        fields["photos"] = len(request.photos)
    if isinstance(request, pb.UpdateMemberRequest):
        fields["member_id"] = request.member.member_id[:80]
        fields["update_mask"] = list(request.update_mask.paths)[:10]
    if isinstance(request, pb.RemoveMemberPhotoRequest):
        fields["photo_id"] = request.photo_id
    if isinstance(response, pb.IdentifyResponse | pb.VerifyResponse):
        fields["decision"] = pb.Decision.Name(response.decision)
        fields["engine"] = pb.Engine.Name(response.engine)
        fields["member_id"] = response.member_id
        fields["confidence"] = round(response.confidence, 3)
        if response.membership_rule:
            fields["membership_rule"] = pb.MembershipRule.Name(response.membership_rule)
        if response.engines:
            fields["engines"] = {
                pb.Engine.Name(r.engine).removeprefix("ENGINE_").lower(): pb.EngineOutcome.Name(
                    r.outcome
                ).removeprefix("ENGINE_OUTCOME_")
                for r in response.engines
            }
            fields["cloud_transactions"] = response.cloud_transactions
    return fields


def rpc(method: Handler[Request, Response]) -> Handler[Request, Response]:
    @functools.wraps(method)
    def handler(self: Any, request: Request, context: grpc.ServicerContext) -> Response:
        started = time.perf_counter()
        arrived = arrival()
        queued = {} if arrived is None else {"queued_ms": round(since(arrived) * 1000, 1)}
        outcome: dict[str, Any] = {"code": "OK"}
        response = None
        try:
            response = method(self, request, context)
            return response
        except FaceGateError as error:
            outcome = {"code": code_of(error).name, "reason": error.reason, "error": error.message}
            context.abort_with_status(to_status(error))
        except Exception:
            log.exception("unexpected error", extra={"method": method.__name__})
            outcome = {"code": "INTERNAL", "reason": "INTERNAL"}
            context.abort_with_status(
                to_status(FaceGateError("internal error; the server log has the details"))
            )
        finally:
            caller = current_caller()
            log.info(
                "rpc",
                extra={
                    "method": method.__name__,
                    "peer": context.peer(),
                    **(caller.log_fields() if caller is not None else {}),
                    **outcome,
                    **queued,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                    **_log_fields(request, response),
                },
            )
        raise AssertionError("unreachable: abort_with_status raises")

    return handler


class FaceGateServicer(pb_grpc.FaceGateServiceServicer):
    def __init__(self, gate: Gate, feed: EventFeed | None = None) -> None:
        self.gate = gate
        self._feed = feed
        # The newest events' messages, made once for every follower (on the loop only).
        self._messages: OrderedDict[int, pb.WatchAccessEventsResponse] = OrderedDict()

    def _message(self, event: AccessEvent) -> pb.WatchAccessEventsResponse:
        message = self._messages.get(event.event_id)
        if message is None:
            message = pb.WatchAccessEventsResponse(event=serde.access_event(event))
            self._messages[event.event_id] = message
            if len(self._messages) > 4096:
                self._messages.popitem(last=False)
        return message

    @property
    def feed(self) -> EventFeed:
        """The followers of the gate's log (app.py passes the server's; else made here)."""
        if self._feed is None:
            self._feed = EventFeed(self.gate.store, self.gate.events_written)
        return self._feed

    def unserved(self, full_method: str, request: Any, error: FaceGateError, waited: float) -> None:
        """No thread served the call (rpc/server.py's OnUnserved): refused for load, or its
        caller left while it waited. An Identify or a Verify still gets its access event."""
        try:
            if isinstance(request, pb.IdentifyRequest):
                self.gate.record_undecided(request.turnstile_id, error, waited)
            elif isinstance(request, pb.VerifyRequest):
                self.gate.record_undecided(request.turnstile_id, error, waited, request.member_id)
        except Exception:
            log.exception("could not log a refused %s", type(request).__name__)

    def _time_left(self, arrived: float | None, context: grpc.ServicerContext) -> float:
        """What is left of the recognition budget, which starts when the call arrived (not
        when a thread took it), and of the caller's deadline."""
        left = self.gate.identify_budget - (0.0 if arrived is None else since(arrived))
        deadline = context.time_remaining()
        return left if deadline is None else min(left, deadline)

    @rpc
    def Identify(
        self, request: pb.IdentifyRequest, context: grpc.ServicerContext
    ) -> pb.IdentifyResponse:
        arrived = arrival()
        arrived = time.monotonic() if arrived is None else arrived
        result = self.gate.identify(
            request.image, request.turnstile_id, self._time_left(arrived, context)
        )
        return serde.decided(pb.IdentifyResponse(), result, since(arrived))

    @rpc
    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        arrived = arrival()
        arrived = time.monotonic() if arrived is None else arrived
        result = self.gate.verify(
            request.member_id,
            request.image,
            request.turnstile_id,
            self._time_left(arrived, context),
        )
        return serde.decided(pb.VerifyResponse(), result, since(arrived))

    @rpc
    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        member = self.gate.enroll(
            request.member_id,
            request.display_name,
            list(request.photos),
            serde.membership_from(request.membership),
        )
        return pb.EnrollResponse(member=serde.member(member))

    @rpc
    def AddMemberPhotos(
        self, request: pb.AddMemberPhotosRequest, context: grpc.ServicerContext
    ) -> pb.AddMemberPhotosResponse:
        member = self.gate.add_member_photos(request.member_id, list(request.photos))
        return pb.AddMemberPhotosResponse(member=serde.member(member))

    @rpc
    def GetMember(
        self, request: pb.GetMemberRequest, context: grpc.ServicerContext
    ) -> pb.GetMemberResponse:
        return pb.GetMemberResponse(member=serde.member(self.gate.get_member(request.member_id)))

    @rpc
    def UpdateMember(
        self, request: pb.UpdateMemberRequest, context: grpc.ServicerContext
    ) -> pb.UpdateMemberResponse:
        member = self.gate.update_member(
            request.member.member_id,
            request.member.display_name,
            serde.membership_from(request.member.membership, "member.membership"),
            list(request.update_mask.paths),
        )
        return pb.UpdateMemberResponse(member=serde.member(member))

    @rpc
    def ListMemberPhotos(
        self, request: pb.ListMemberPhotosRequest, context: grpc.ServicerContext
    ) -> pb.ListMemberPhotosResponse:
        photos = self.gate.list_member_photos(request.member_id, request.include_photos)
        return pb.ListMemberPhotosResponse(photos=[serde.member_photo(p) for p in photos])

    @rpc
    def RemoveMemberPhoto(
        self, request: pb.RemoveMemberPhotoRequest, context: grpc.ServicerContext
    ) -> pb.RemoveMemberPhotoResponse:
        member = self.gate.remove_member_photo(request.member_id, request.photo_id)
        return pb.RemoveMemberPhotoResponse(member=serde.member(member))

    @rpc
    def ListMembers(
        self, request: pb.ListMembersRequest, context: grpc.ServicerContext
    ) -> pb.ListMembersResponse:
        after = serde.decode_page_token(request.page_token, "after", str)
        members, next_after = self.gate.list_members(request.page_size, str(after or ""))
        return pb.ListMembersResponse(
            members=[serde.member(m) for m in members],
            next_page_token=serde.encode_page_token(after=next_after) if next_after else "",
        )

    @rpc
    def DeleteMember(
        self, request: pb.DeleteMemberRequest, context: grpc.ServicerContext
    ) -> pb.DeleteMemberResponse:
        self.gate.delete_member(request.member_id)
        return pb.DeleteMemberResponse()

    @rpc
    def ListAccessEvents(
        self, request: pb.ListAccessEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAccessEventsResponse:
        before = serde.decode_page_token(request.page_token, "before", int)
        events, next_before = self.gate.list_events(
            serde.event_filter(request), request.page_size, int(before) if before else None
        )
        return pb.ListAccessEventsResponse(
            events=[serde.access_event(e) for e in events],
            next_page_token=serde.encode_page_token(before=next_before) if next_before else "",
        )

    @rpc
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        return serde.status(self.gate.status())

    @rpc
    def SyncCloud(
        self, request: pb.SyncCloudRequest, context: grpc.ServicerContext
    ) -> pb.SyncCloudResponse:
        if request.retry_parked:
            return pb.SyncCloudResponse(retried=self.gate.retry_parked())
        return serde.sync_report(
            self.gate.sync_cloud(request.dry_run, report_only=request.report_only)
        )

    @rpc
    def SearchFaces(
        self, request: pb.SearchFacesRequest, context: grpc.ServicerContext
    ) -> pb.SearchFacesResponse:
        result = self.gate.search(
            request.image, request.max_candidates, self._time_left(arrival(), context)
        )
        return serde.search_faces(result)

    async def WatchAccessEvents(
        self, request: pb.WatchAccessEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchAccessEventsResponse]:
        """On the server's loop, not in a thread: the stored events after the id asked for,
        then each new one (feed.py). One log line when the stream ends."""
        started = time.perf_counter()
        outcome: dict[str, Any] = {"code": "OK"}
        sent, last = 0, request.after_event_id
        try:
            after, where = serde.watch_filter(request)
            async for event in self.feed.follow(after, where):
                yield self._message(event)
                sent, last = sent + 1, event.event_id
        except FaceGateError as error:
            outcome = {"code": code_of(error).name, "reason": error.reason, "error": error.message}
            await context.abort_with_status(to_status(error))
        except asyncio.CancelledError:  # the caller went away, or the server stopped
            outcome = {"code": "CANCELLED"}
            raise
        except Exception:
            log.exception("unexpected error", extra={"method": "WatchAccessEvents"})
            outcome = {"code": "INTERNAL", "reason": "INTERNAL"}
            await context.abort_with_status(
                to_status(FaceGateError("internal error; the server log has the details"))
            )
        finally:
            caller = current_caller()
            log.info(
                "rpc",
                extra={
                    "method": "WatchAccessEvents",
                    "peer": context.peer(),
                    **(caller.log_fields() if caller is not None else {}),
                    **outcome,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                    "after_event_id": request.after_event_id,
                    "events_sent": sent,
                    "last_event_id": last,
                },
            )
