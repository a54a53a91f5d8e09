"""Conversions between facegate.v1 messages and the domain's values."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

from facegate.v1 import facegate_service_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2

from facegate_server import validation
from facegate_server.domain import (
    AccessEvent,
    AccessWindow,
    Change,
    Decision,
    EngineKind,
    EngineReport,
    EventFilter,
    FaceBox,
    FaceQuality,
    Member,
    MemberPhoto,
    Membership,
    MembershipRule,
    Reconciliation,
    SearchResult,
    Status,
    SyncReport,
)
from facegate_server.errors import InvalidArgument
from facegate_server.gate import IdentifyResult


def timestamp(t: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(t)
    return message


def duration(d: timedelta) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(d)
    return message


def decision(d: Decision) -> pb.Decision.ValueType:
    return pb.Decision.Value(f"DECISION_{d.value}")


def decision_from(value: pb.Decision.ValueType, field: str) -> Decision:
    """A Decision sent by a client; INVALID_ARGUMENT for UNSPECIFIED or an unknown number."""
    if value not in pb.Decision.values() or value == pb.DECISION_UNSPECIFIED:
        raise InvalidArgument(field, "is not a decision", reason="DECISION_INVALID")
    return Decision(pb.Decision.Name(value).removeprefix("DECISION_"))


def membership_rule(rule: MembershipRule | None) -> pb.MembershipRule.ValueType:
    if rule is None:
        return pb.MEMBERSHIP_RULE_UNSPECIFIED
    return pb.MembershipRule.Value(f"MEMBERSHIP_RULE_{rule.value}")


def membership_rule_from(value: pb.MembershipRule.ValueType, field: str) -> MembershipRule | None:
    if value == pb.MEMBERSHIP_RULE_UNSPECIFIED:
        return None
    if value not in pb.MembershipRule.values():
        raise InvalidArgument(field, "is not a membership rule", reason="MEMBERSHIP_RULE_INVALID")
    return MembershipRule(pb.MembershipRule.Name(value).removeprefix("MEMBERSHIP_RULE_"))


def engine(e: EngineKind) -> pb.Engine.ValueType:
    return pb.Engine.Value(f"ENGINE_{e.value}")


def engine_report(r: EngineReport) -> pb.EngineReport:
    message = pb.EngineReport(
        engine=engine(r.engine),
        outcome=pb.EngineOutcome.Value(f"ENGINE_OUTCOME_{r.outcome.value}"),
        member_id=r.member_id,
        confidence=r.confidence,
        detail=r.detail,
        transactions=r.transactions,
    )
    if r.decision is not None:
        message.decision = decision(r.decision)
    if r.latency is not None:
        message.latency.CopyFrom(duration(r.latency))
    return message


Decided = TypeVar("Decided", pb.IdentifyResponse, pb.VerifyResponse)


def decided(response: Decided, result: IdentifyResult, server_latency: float) -> Decided:
    """Fill an Identify or Verify response (the same fields) from the gate's result, and
    the seconds it spent in the server."""
    found = result.identification
    response.decision = decision(found.decision)
    response.member_id = found.member_id
    response.display_name = result.display_name
    response.confidence = found.confidence
    response.engine = engine(found.engine)
    response.event_id = result.event.event_id
    response.hint = found.hint
    response.engines.extend(engine_report(r) for r in found.reports)
    response.cloud_transactions = found.cloud_transactions
    response.membership_rule = membership_rule(found.rule)
    if found.face_box is not None:
        response.face_box.CopyFrom(face_box(found.face_box))
    response.server_latency.FromNanoseconds(int(server_latency * 1e9))
    return response


def face_box(box: FaceBox) -> pb.FaceBox:
    return pb.FaceBox(left=box.left, top=box.top, width=box.width, height=box.height)


def member(m: Member) -> pb.Member:
    return pb.Member(
        member_id=m.member_id,
        display_name=m.display_name,
        face_count=m.face_count,
        create_time=timestamp(m.create_time),
        update_time=timestamp(m.update_time),
        membership=membership(m.membership),
        cloud_state=m.cloud_state,
    )


def membership(m: Membership) -> pb.Membership:
    message = pb.Membership(
        suspended=m.suspended,
        suspension_reason=m.suspension_reason,
        access_hours=[
            pb.AccessWindow(
                day=pb.DayOfWeek.ValueType(w.day + 1), start_minute=w.start, end_minute=w.end
            )
            for w in m.access_hours
        ],
        sites=list(m.sites),
    )
    if m.valid_from is not None:
        message.valid_from.CopyFrom(timestamp(m.valid_from))
    if m.valid_until is not None:
        message.valid_until.CopyFrom(timestamp(m.valid_until))
    return message


def _instant(message: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return message.ToDatetime(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(
            field, "is not a valid time (years 1 to 9999)", reason="TIME_INVALID"
        ) from None


def membership_from(message: pb.Membership, field: str = "membership") -> Membership:
    """A client's Membership; its windows' days checked here, the rest by validation."""
    windows = []
    for i, w in enumerate(message.access_hours):
        if not pb.DAY_OF_WEEK_MONDAY <= w.day <= pb.DAY_OF_WEEK_SUNDAY:
            raise InvalidArgument(
                f"{field}.access_hours[{i}].day", "is required", reason="ACCESS_HOURS_INVALID"
            )
        windows.append(AccessWindow(int(w.day) - 1, w.start_minute, w.end_minute))
    return Membership(
        valid_from=(
            _instant(message.valid_from, f"{field}.valid_from")
            if message.HasField("valid_from")
            else None
        ),
        valid_until=(
            _instant(message.valid_until, f"{field}.valid_until")
            if message.HasField("valid_until")
            else None
        ),
        suspended=message.suspended,
        suspension_reason=message.suspension_reason,
        access_hours=tuple(windows),
        sites=tuple(message.sites),
    )


def face_quality(q: FaceQuality) -> pb.FaceQuality:
    return pb.FaceQuality(
        size=q.size, sharpness=q.sharpness, brightness=q.brightness, yaw=q.yaw, pitch=q.pitch
    )


def member_photo(p: MemberPhoto) -> pb.MemberPhoto:
    message = pb.MemberPhoto(
        photo_id=p.photo_id, create_time=timestamp(p.create_time), photo=p.photo or b""
    )
    if p.quality is not None:
        message.quality.CopyFrom(face_quality(p.quality))
    return message


def access_event(e: AccessEvent) -> pb.AccessEvent:
    return pb.AccessEvent(
        event_id=e.event_id,
        time=timestamp(e.time),
        turnstile_id=e.turnstile_id,
        member_id=e.member_id,
        decision=decision(e.decision),
        engine=engine(e.engine),
        confidence=e.confidence,
        server_latency=duration(e.latency),
        engines=[engine_report(r) for r in e.reports],
        membership_rule=membership_rule(e.rule),
        kind=pb.AccessKind.Value(f"ACCESS_KIND_{e.kind.value}"),
        claimed_member_id=e.claimed_member_id,
        detail=e.detail,
    )


def _time_field(
    request: pb.ListAccessEventsRequest, field: Literal["start_time", "end_time"]
) -> datetime | None:
    if not request.HasField(field):
        return None
    try:
        value: datetime = getattr(request, field).ToDatetime(UTC)
    except (ValueError, OverflowError):  # seconds or nanos out of the Timestamp range
        raise InvalidArgument(
            field, "is not a valid time (years 1 to 9999)", reason="TIME_INVALID"
        ) from None
    return value


def event_filter(request: pb.ListAccessEventsRequest) -> EventFilter:
    start = _time_field(request, "start_time")
    end = _time_field(request, "end_time")
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("end_time", "must be after start_time", reason="TIME_RANGE_INVALID")
    decisions = tuple(decision_from(d, f"decisions[{i}]") for i, d in enumerate(request.decisions))
    rule = membership_rule_from(request.membership_rule, "membership_rule")
    return EventFilter(request.member_id, request.turnstile_id, start, end, decisions, rule)


def watch_filter(request: pb.WatchAccessEventsRequest) -> tuple[int, EventFilter]:
    """WatchAccessEvents' starting point and filter (ids and enums checked)."""
    if request.after_event_id < 0:
        raise InvalidArgument(
            "after_event_id", "must not be negative", reason="AFTER_EVENT_ID_INVALID"
        )
    if request.member_id:
        validation.member_id(request.member_id)
    if request.turnstile_id:
        validation.turnstile_id(request.turnstile_id)
    decisions = tuple(decision_from(d, f"decisions[{i}]") for i, d in enumerate(request.decisions))
    rule = membership_rule_from(request.membership_rule, "membership_rule")
    where = EventFilter(request.member_id, request.turnstile_id, decisions=decisions, rule=rule)
    return request.after_event_id, where


# Page tokens are opaque to clients: base64url of a small JSON object.
MAX_PAGE_TOKEN = 512


def encode_page_token(**position: str | int) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def decode_page_token(token: str, key: str, kind: type[str] | type[int]) -> str | int | None:
    if not token:
        return None
    try:
        if len(token) > MAX_PAGE_TOKEN:  # before decoding: no deep or huge JSON
            raise ValueError(key)
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))[key]
        if type(value) is not kind:
            raise TypeError(key)
        if isinstance(value, int) and not -(2**63) <= value < 2**63:  # SQLite's INTEGER
            raise ValueError(key)
        return value  # type: ignore[no-any-return,unused-ignore]
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeEncodeError):
        raise InvalidArgument(
            "page_token", "is not a token returned by this method", reason="PAGE_TOKEN_INVALID"
        ) from None


def status(s: Status) -> pb.GetStatusResponse:
    e = s.engines
    message = pb.GetStatusResponse(
        routing_policy=e.policy,
        circuit_state=pb.CircuitState.Value("CIRCUIT_STATE_" + e.circuit.upper().replace("-", "_")),
        outbox_depth=s.outbox_depth,
        last_cloud_error=e.last_cloud_error,
        cloud_training=e.cloud_training,
        cloud_transactions=[
            pb.Count(name=k, count=v) for k, v in sorted(e.cloud_transactions.items())
        ],
        decisions=[pb.Count(name=k, count=v) for k, v in sorted(s.decisions.items())],
        member_count=s.member_count,
        cloud_readiness=e.cloud_readiness,
        outbox_waiting=e.outbox_waiting,
        outbox_parked=s.outbox_parked,
        parked=[
            pb.ParkedChange(
                kind=p.kind, member_id=p.member_id, face_id=p.face_id or 0, reason=p.parked
            )
            for p in s.parked
        ],
        cloud_cost=e.cloud_cost,
        workers=[
            pb.WorkerStatus(slot=w.slot, state=w.state, pid=w.pid, jobs=w.jobs, restarts=w.restarts)
            for w in e.workers
        ],
        recognition_queue=e.recognition_queue,
        admission=[pb.Count(name=k, count=v) for k, v in sorted(e.admission.items())],
        refusals=[pb.Count(name=k, count=v) for k, v in sorted(s.refusals.items())],
        can_decide=e.can_decide,
        event_retention_days=s.event_retention_days,
    )
    if s.purge_pending_since is not None:
        message.purge_pending_since.CopyFrom(timestamp(s.purge_pending_since))
    if s.oldest_event_time is not None:
        message.oldest_event_time.CopyFrom(timestamp(s.oldest_event_time))
    message.shared_figures_unknown = s.shared_figures_unknown
    if e.last_cloud_error_time is not None:
        message.last_cloud_error_time.CopyFrom(timestamp(e.last_cloud_error_time))
    if e.reconciliation is not None:
        message.reconciliation.CopyFrom(reconciliation(e.reconciliation))
    store = s.store
    message.store.CopyFrom(
        pb.StoreStatus(
            kind=store.kind,
            name=store.name,
            state=store.state,
            pending_events=store.pending_events,
            applied_change=store.applied_change,
            last_error=store.last_error,
        )
    )
    if store.copy_current is not None:
        message.store.copy_current_time.CopyFrom(timestamp(store.copy_current))
    return message


def reconciliation(r: Reconciliation) -> pb.Reconciliation:
    return pb.Reconciliation(
        reconciliation_id=r.reconciliation_id,
        dry_run=r.dry_run,
        phase=r.phase,
        persons_checked=r.persons_checked,
        members_checked=r.members_checked,
        changes_found=r.changes_found,
        waiting=r.waiting,
    )


def sync_report(report: SyncReport) -> pb.SyncCloudResponse:
    message = pb.SyncCloudResponse()
    if report.running is not None:
        message.running.CopyFrom(reconciliation(report.running))
    if report.finished is not None:
        message.finished.CopyFrom(reconciliation(report.finished))
        message.changes.extend(sync_change(c) for c in report.finished.changes)
    return message


def sync_change(c: Change) -> pb.SyncChange:
    return pb.SyncChange(
        kind=pb.SyncChangeKind.Value("SYNC_CHANGE_KIND_" + c.kind.name),
        member_id=c.member_id,
        person_id=c.person_id,
        detail=c.detail,
        applied=c.applied,
    )


def search_faces(result: SearchResult) -> pb.SearchFacesResponse:
    found = result.identification
    message = pb.SearchFacesResponse(
        decision=decision(found.decision),
        candidates=[
            pb.SearchCandidate(member_id=c.member_id, confidence=c.confidence, distance=c.distance)
            for c in result.candidates
        ],
        hint=found.hint,
    )
    if found.face_box is not None:
        message.face_box.CopyFrom(face_box(found.face_box))
    if result.quality is not None:
        message.quality.CopyFrom(face_quality(result.quality))
    return message
