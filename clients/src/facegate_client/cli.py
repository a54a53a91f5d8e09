"""The `facegate` command: enrol members, identify or verify a frame, read members and the
access log.

    facegate enroll --member-id m-1001 --name "Kim Jiwoo" kim1.jpg kim2.jpg
    facegate add-photos --member-id m-1001 kim3.jpg
    facegate identify frame.jpg --turnstile-id gate-1
    facegate verify --member-id m-1001 frame.jpg --turnstile-id gate-1
    facegate members list | get ID | delete ID
    facegate members update m-1001 --valid-until 2027-01-01 --hours 'Mon-Fri 06:00-16:00'
    facegate members update m-1001 --suspend "unpaid" | --resume
    facegate members photos m-1001 | remove-photo m-1001 PHOTO_ID
    facegate events --member-id m-1001 --since 2026-11-26T00:00:00Z --limit 20
    facegate events --decision DENIED_MEMBERSHIP_INACTIVE --rule EXPIRED --since 2026-11-23
    facegate events --follow --after 1234

Every client command takes --target HOST:PORT (default: $FACEGATE_TARGET, else
127.0.0.1:50051; several servers: `10.0.0.5:50051,10.0.0.6:50051`, `ipv4:...`, `ipv6:...`
or `dns:///NAME:PORT`), --timeout SECONDS and --json (protobuf JSON, with the proto field
names).
A server with callers configured needs a bearer token: $FACEGATE_TOKEN (no flag: other
users see command lines). TLS: --tls, --ca PEM, and --cert PEM --key PEM for mutual TLS
(or $FACEGATE_CA, $FACEGATE_CERT, $FACEGATE_KEY); --server-name NAME ($FACEGATE_SERVER_NAME):
the name the servers' certificates carry, when the target is IP addresses.

Exit codes: 0 on success (a denied frame is a success), 1 when the server answers with an
error, 2 for a usage error or a local file that cannot be read.

Other packages add commands through the entry point group `facegate.commands`: each entry
point is a callable taking the argparse subparsers object; it adds its own subparser and
sets `func`, a handler taking the parsed `argparse.Namespace` and returning the exit code.
facegate-server adds `serve` this way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from facegate.v1 import facegate_service_pb2 as pb
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from facegate_client.client import DEFAULT_TARGET, KEEP, FaceGateClient
from facegate_client.errors import FaceGateError
from facegate_client.membership import format_membership, parse_hours

__all__ = ["PLUGIN_GROUP", "build_parser", "main"]

PLUGIN_GROUP = "facegate.commands"
"""The entry point group through which other packages add subcommands."""

_MAX_PAGE_SIZE = 1000
_EPILOG = "Server commands (serve, ...) come with the facegate-server package."


class _LocalFileError(Exception):
    """A file named on the command line cannot be read."""


class _UsageError(Exception):
    """Options that parse but say nothing to do (exit 2, like argparse's errors)."""


# ---------------------------------------------------------------- argument types


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _iso_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2026-11-26T23:00:00Z)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso_time_or_none(text: str) -> datetime | None:
    """An ISO 8601 time, or `none` (no start / no end)."""
    return None if text.lower() == "none" else _iso_time(text)


def _hours(text: str) -> list[pb.AccessWindow]:
    try:
        return parse_hours(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sites(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _enum_value(enum: Any, prefix: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        name = text.upper().removeprefix(prefix)
        try:
            value: int = enum.Value(prefix + name)
        except ValueError:
            names = [
                n.removeprefix(prefix)
                for n in [v.name for v in enum.DESCRIPTOR.values]
                if not n.endswith("UNSPECIFIED")
            ]
            raise argparse.ArgumentTypeError(f"not one of {', '.join(names)}: {text!r}") from None
        return value

    return parse


# ---------------------------------------------------------------- output


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def _decision(value: int) -> str:
    return _enum_name(pb.Decision, value, "DECISION_")


def _engine(value: int) -> str:
    return _enum_name(pb.Engine, value, "ENGINE_").lower()


def _millis(duration: Duration) -> str:
    return f"{round(duration.seconds * 1000 + duration.nanos / 1e6)} ms"


def _time(timestamp: Timestamp, present: bool) -> str:
    if not present:
        return "-"
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


_NOT_ANSWERED = {
    pb.ENGINE_OUTCOME_TIMED_OUT: "timed out",
    pb.ENGINE_OUTCOME_CIRCUIT_OPEN: "circuit open",
    pb.ENGINE_OUTCOME_THROTTLED: "throttled",
    pb.ENGINE_OUTCOME_ERROR: "error",
    pb.ENGINE_OUTCOME_NOT_TRAINED: "not trained",
    pb.ENGINE_OUTCOME_DISAGREED: "disagreed",
}


def format_identify(response: pb.IdentifyResponse | pb.VerifyResponse) -> str:
    """`GRANTED m-1001 "Kim Jiwoo" confidence 0.93 (local) 148 ms [hint]`, then why another
    engine did not decide, e.g. `{azure: timed out}` (the details are in --json)."""
    parts = [_decision(response.decision)]
    if response.member_id:
        parts.append(response.member_id)
    if response.display_name:
        parts.append(_quoted(response.display_name))
    parts.append(f"confidence {response.confidence:.2f}")
    parts.append(f"({_engine(response.engine)})")
    parts.append(_millis(response.server_latency))
    if response.hint:
        parts.append(f"[{response.hint}]")
    for report in response.engines:
        if report.outcome in _NOT_ANSWERED:
            parts.append(f"{{{_engine(report.engine)}: {_NOT_ANSWERED[report.outcome]}}}")
    return " ".join(parts)


def format_member(member: pb.Member) -> str:
    """`m-1001  "Kim Jiwoo"  2 faces  enrolled 2026-11-26T23:00:00Z`."""
    faces = "1 face" if member.face_count == 1 else f"{member.face_count} faces"
    enrolled = _time(member.create_time, member.HasField("create_time"))
    line = f"{member.member_id}  {_quoted(member.display_name)}  {faces}  enrolled {enrolled}"
    return line + (f"  cloud: {member.cloud_state}" if member.cloud_state else "")


def format_member_in_full(member: pb.Member) -> str:
    """`format_member`'s line, then the membership (`members get`, `update`)."""
    return "\n".join(
        [format_member(member), *(f"  {line}" for line in format_membership(member.membership))]
    )


def format_event(event: pb.AccessEvent) -> str:
    """`2026-11-26T23:01:02Z  gate-1  GRANTED  m-1001  0.93  local  148 ms`; a verification
    ends with what was claimed, and why when the decision does not say:
    `... verify m-1001` or `... verify m-9 (no member with this id)`; a refusal by a
    membership rule ends with the rule (`EXPIRED`)."""
    fields = [
        _time(event.time, event.HasField("time")),
        event.turnstile_id,
        _decision(event.decision),
        event.member_id or "-",
        f"{event.confidence:.2f}",
        _engine(event.engine),
        _millis(event.server_latency),
    ]
    if event.kind == pb.ACCESS_KIND_VERIFY:
        fields.append(f"verify {event.claimed_member_id or '-'}")
    if event.membership_rule:
        fields.append(_enum_name(pb.MembershipRule, event.membership_rule, "MEMBERSHIP_RULE_"))
    line = "  ".join(fields)
    return f"{line} ({event.detail})" if event.detail else line


def format_photo(photo: pb.MemberPhoto) -> str:
    """`17  added 2026-11-26T23:00:00Z  size 212  sharpness 85.1  brightness 120  yaw 0.04
    pitch 0.78` (the measurements only where the server measured them)."""
    parts = [
        str(photo.photo_id),
        f"added {_time(photo.create_time, photo.HasField('create_time'))}",
    ]
    if photo.HasField("quality"):
        q = photo.quality
        parts += [
            f"size {q.size}",
            f"sharpness {q.sharpness:.1f}",
            f"brightness {q.brightness:.0f}",
            f"yaw {q.yaw:.2f}",
            f"pitch {q.pitch:.2f}",
        ]
    return "  ".join(parts)


def _print_json(message: Message, out: TextIO) -> None:
    print(
        json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        ),
        file=out,
    )


def _show(args: argparse.Namespace, out: TextIO, message: Message, line: str) -> None:
    """Print `message` as JSON with --json, else `line`."""
    if args.json:
        _print_json(message, out)
    else:
        print(line, file=out)


# ---------------------------------------------------------------- commands


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise _LocalFileError(f"cannot read {path!r}: {err.strerror or err}") from None


def _read_files(paths: Sequence[str]) -> list[bytes]:
    return [_read_file(path) for path in paths]


Handler = Callable[[FaceGateClient, argparse.Namespace, TextIO], None]


def _cmd_enroll(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    photos = _read_files(args.photos)
    membership = pb.Membership(access_hours=args.hours or [], sites=args.sites or [])
    for name in ("valid_from", "valid_until"):
        value = getattr(args, name)
        if value is not None:
            getattr(membership, name).FromDatetime(value)
    member = client.enroll(args.member_id, photos, display_name=args.name, membership=membership)
    _show(args, out, member, format_member(member))


def _cmd_add_photos(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    photos = _read_files(args.photos)
    member = client.add_member_photos(args.member_id, photos)
    _show(args, out, member, format_member(member))


def _cmd_identify(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    frame = _read_file(args.frame)
    response = client.identify(frame, args.turnstile_id)
    _show(args, out, response, format_identify(response))


def _cmd_verify(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    frame = _read_file(args.frame)
    response = client.verify(args.member_id, frame, args.turnstile_id)
    _show(args, out, response, format_identify(response))


def _cmd_members_list(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    members = client.iter_members(page_size=args.page_size)
    if args.json:
        _print_json(pb.ListMembersResponse(members=list(members)), out)
        return
    for member in members:
        print(format_member(member), file=out)


def _cmd_members_get(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    member = client.get_member(args.member_id)
    _show(args, out, member, format_member_in_full(member))


def _given(args: argparse.Namespace, name: str) -> Any:
    """A flag's value, or KEEP when it was not given (argparse.SUPPRESS leaves it out)."""
    return getattr(args, name, KEEP)


def _cmd_members_update(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    suspended: Any = KEEP
    reason: Any = KEEP
    if args.suspend is not None:
        suspended, reason = True, args.suspend
    elif args.resume:
        suspended, reason = False, ""
    changes = ("name", "valid_from", "valid_until", "hours", "sites")
    if suspended is KEEP and not any(hasattr(args, name) for name in changes):
        raise _UsageError(
            "members update: nothing to change (--name, --valid-from, --valid-until, "
            "--suspend, --resume, --hours, --sites)"
        )
    member = client.update_member(
        args.member_id,
        display_name=_given(args, "name"),
        valid_from=_given(args, "valid_from"),
        valid_until=_given(args, "valid_until"),
        suspended=suspended,
        suspension_reason=reason,
        access_hours=_given(args, "hours"),
        sites=_given(args, "sites"),
    )
    _show(args, out, member, format_member_in_full(member))


def _cmd_members_photos(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    photos = client.list_member_photos(args.member_id, include_photos=args.save is not None)
    if args.save is not None:
        folder = Path(args.save)
        for photo in photos:
            if photo.photo:
                try:
                    (
                        folder / f"{args.member_id}-{photo.photo_id}{_suffix(photo.photo)}"
                    ).write_bytes(photo.photo)
                except OSError as err:
                    raise _LocalFileError(
                        f"cannot write into {args.save!r}: {err.strerror or err}"
                    ) from None
    if args.json:
        _print_json(pb.ListMemberPhotosResponse(photos=photos), out)
        return
    for photo in photos:
        kept = " (saved)" if args.save is not None and photo.photo else ""
        print(format_photo(photo) + kept, file=out)


def _suffix(photo: bytes) -> str:
    for magic, suffix in (
        (b"\xff\xd8", ".jpg"),
        (b"\x89PNG", ".png"),
        (b"GIF8", ".gif"),
        (b"BM", ".bmp"),
    ):
        if photo.startswith(magic):
            return suffix
    return ".img"


def _cmd_members_remove_photo(
    client: FaceGateClient, args: argparse.Namespace, out: TextIO
) -> None:
    member = client.remove_member_photo(args.member_id, args.photo_id)
    _show(args, out, member, format_member(member))


def _cmd_members_delete(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    client.delete_member(args.member_id)
    _show(args, out, pb.DeleteMemberResponse(), f"deleted {args.member_id}")


def _cmd_events(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.follow:
        _follow_events(client, args, out)
        return
    if args.after is not None:
        raise _UsageError("--after ID goes with --follow")
    limit: int = 50 if args.limit is None else args.limit
    events = client.iter_access_events(
        member_id=args.member_id,
        turnstile_id=args.turnstile_id,
        start_time=args.since,
        end_time=args.until,
        page_size=min(limit, _MAX_PAGE_SIZE) if limit else 100,
        decisions=args.decision or (),
        membership_rule=args.rule or pb.MEMBERSHIP_RULE_UNSPECIFIED,
    )
    selected = itertools.islice(events, limit) if limit else events
    if args.json:
        _print_json(pb.ListAccessEventsResponse(events=list(selected)), out)
        return
    for event in selected:
        print(format_event(event), file=out)


def _follow_events(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    """`events --follow`: each event as it is written, oldest first from --after; through
    server restarts, resumed after the last event printed (none lost, none twice)."""
    if args.since is not None or args.until is not None:
        raise _UsageError("--since and --until do not go with --follow (use --after ID)")
    limit: int = args.limit or 0
    last: int | None = args.after  # None: the last 10 first (follow_events' tail)

    def reconnecting(error: FaceGateError, delay: float) -> None:
        where = "with the last 10" if last is None else f"after event {last}"
        print(f"facegate: {error}; resuming {where} in {delay:.1f} s", file=sys.stderr, flush=True)

    events = client.follow_events(
        last,
        member_id=args.member_id,
        turnstile_id=args.turnstile_id,
        decisions=args.decision or (),
        membership_rule=args.rule or pb.MEMBERSHIP_RULE_UNSPECIFIED,
        on_reconnect=reconnecting,
    )
    for count, event in enumerate(events, start=1):
        last = event.event_id
        if args.json:  # one JSON object a line
            text = json_format.MessageToJson(event, preserving_proto_field_name=True, indent=None)
            print(text, file=out, flush=True)
        else:
            print(format_event(event), file=out, flush=True)
        if count == limit:
            return


def format_store(store: pb.StoreStatus, now: datetime | None = None) -> str:
    """`store: postgresql://db:5432/gym connected, local copy current 0.4 s ago`."""
    line = f"store: {store.name} {store.state}"
    if store.HasField("copy_current_time"):
        current = store.copy_current_time.ToDatetime(tzinfo=UTC)
        age = ((now or datetime.now(UTC)) - current).total_seconds()
        line += f", local copy current {max(0.0, age):.1f} s ago"
    else:
        line += ", no local copy yet"
    if store.pending_events:
        line += f", {store.pending_events} access events waiting to be shipped"
    if store.last_error:  # libpq's hints come on lines of their own: one line here
        line += f" ({' '.join(store.last_error.split())})"
    return line


def format_status(status: pb.GetStatusResponse) -> str:
    """Several `name: value` lines for operators."""
    circuit = _enum_name(pb.CircuitState, status.circuit_state, "CIRCUIT_STATE_").lower()
    # A chain server cut off from PostgreSQL cannot read the outbox or the access log there.
    away = status.shared_figures_unknown
    unknown = "unknown (the store is unreachable)"
    lines = [
        f"routing: {status.routing_policy}",
        f"cloud circuit: {circuit.replace('_', '-')}",
        f"outbox depth: {unknown if away else status.outbox_depth}",
        f"cloud training: {status.cloud_training or '-'}",
        f"members: {status.member_count}",
    ]
    if status.cloud_readiness:
        lines.insert(1, f"cloud: {status.cloud_readiness}")
    if status.outbox_waiting:
        lines.append(f"outbox waiting: {status.outbox_waiting}")
    if status.outbox_parked:
        lines.append(f"outbox parked: {status.outbox_parked} (retry: facegate sync --retry-parked)")
        for parked in status.parked:
            face = f" face {parked.face_id}" if parked.face_id else ""
            lines.append(f"  {parked.kind} {parked.member_id}{face}: {parked.reason}")
    if status.HasField("reconciliation"):
        lines.append(f"cloud sync: {format_reconciliation(status.reconciliation)}")
    if status.store.kind == "postgresql":
        lines.append(format_store(status.store))
    if status.cloud_cost:
        lines.append(f"cloud cost: {status.cloud_cost}")
    if status.last_cloud_error:
        when = _time(status.last_cloud_error_time, status.HasField("last_cloud_error_time"))
        lines.append(f"last cloud error: {when} {status.last_cloud_error}")
    if status.workers:
        if not status.can_decide:
            lines.append("CANNOT DECIDE: no recognition worker running and no reachable cloud")
        workers = ", ".join(
            f"{w.slot}: {w.state} pid {w.pid or '-'} jobs {w.jobs} restarts {w.restarts}"
            for w in status.workers
        )
        lines.append(f"workers: {workers}")
        lines.append(f"recognition queue: {status.recognition_queue}")
    if status.HasField("purge_pending_since"):
        since = _time(status.purge_pending_since, True)
        lines.append(
            f"purge pending since {since}: deleted data stays in the store's files until"
            " another process's read transaction ends (a backup, the sqlite3 shell)"
        )
    oldest = (
        unknown if away else _time(status.oldest_event_time, status.HasField("oldest_event_time"))
    )
    kept = f"{status.event_retention_days} days" if status.event_retention_days else "forever"
    lines.append(f"access events: oldest {oldest}, kept {kept}")
    for title, counts in (
        ("cloud transactions", status.cloud_transactions),
        ("decisions", status.decisions),
        ("admission", status.admission),
        ("refused calls", status.refusals),
    ):
        total = sum(c.count for c in counts)
        detail = ", ".join(f"{c.name} {c.count}" for c in counts)
        lines.append(f"{title}: {total}" + (f" ({detail})" if detail else ""))
    return "\n".join(lines)


def format_change(change: pb.SyncChange) -> str:
    """`orphan_person  m-9  p-123  deleted from the cloud  [applied]`."""
    kind = _enum_name(pb.SyncChangeKind, change.kind, "SYNC_CHANGE_KIND_").lower()
    done = "applied" if change.applied else "not applied"
    return "  ".join(
        [kind, change.member_id or "-", change.person_id or "-", change.detail, f"[{done}]"]
    )


def _cmd_status(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    status = client.get_status()
    _show(args, out, status, format_status(status))


def format_reconciliation(r: pb.Reconciliation) -> str:
    """`reconciliation 3 (dry run): persons, 2000 cloud persons and 0 members checked, 1
    difference so far`."""
    kind = " (dry run)" if r.dry_run else ""
    return (
        f"reconciliation {r.reconciliation_id}{kind}: {r.phase}, {r.persons_checked} cloud"
        f" persons and {r.members_checked} members checked, {r.changes_found} differences"
        + (" so far" if r.phase != "done" else "")
        + (f" ({r.waiting})" if r.waiting else "")
    )


def _cmd_sync(client: FaceGateClient, args: argparse.Namespace, out: TextIO) -> None:
    response = client.sync_cloud(
        dry_run=args.dry_run, retry_parked=args.retry_parked, timeout=args.timeout
    )
    if args.retry_parked:
        if args.json:
            _print_json(response, out)
        else:
            print(f"{response.retried} parked changes put back in line", file=out)
        return
    waited = args.wait is not None and response.HasField("running")
    if waited:
        response = client.wait_for_sync(response.running.reconciliation_id, timeout=args.wait)
    if args.json:
        _print_json(response, out)
        return
    if response.HasField("running"):
        print(
            format_reconciliation(response.running)
            + " (runs in the background: `facegate sync --wait` shows its report)",
            file=out,
        )
    if not response.HasField("finished"):
        return
    finished = response.finished
    if not waited:
        print(f"the last finished {format_reconciliation(finished)}:", file=out)
    for change in response.changes:
        print(format_change(change), file=out)
    verb = "would change" if finished.dry_run else "changed"
    applied = sum(c.applied for c in response.changes)
    shown = len(response.changes)
    print(
        f"{finished.changes_found} differences"
        + (f" ({shown} shown)" if shown < finished.changes_found else "")
        + f"; {verb} {shown if finished.dry_run else applied}",
        file=out,
    )


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """FaceGateClient's token and TLS arguments: $FACEGATE_TOKEN, --tls, --ca, --cert, --key."""
    found: dict[str, Any] = {"token": os.environ.get("FACEGATE_TOKEN") or None}
    if args.tls:
        found["tls"] = True
    if args.server_name:
        found["server_name"] = args.server_name
    for name, path in (
        ("root_certificates", args.ca),
        ("certificate_chain", args.cert),
        ("private_key", args.key),
    ):
        if path:
            found[name] = _read_file(path)
    return found


def _run_client_command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        timeout: float | None = args.timeout
        try:
            options = _credentials(args)
            if timeout is not None:
                options.update(timeout=timeout, identify_timeout=timeout, enroll_timeout=timeout)
            client = FaceGateClient(args.target, **options)
        except (_LocalFileError, ValueError) as err:  # a bad $FACEGATE_TOKEN, --cert alone
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            with client:
                handler(client, args, sys.stdout)
        except (_LocalFileError, _UsageError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (FaceGateError, TimeoutError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0

    return run


# ---------------------------------------------------------------- parser


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=os.environ.get("FACEGATE_TARGET") or DEFAULT_TARGET,
        help=(
            f"the server (default: $FACEGATE_TARGET, else {DEFAULT_TARGET}); several:"
            " IP:PORT,IP:PORT or dns:///NAME:PORT (a name with several records)"
        ),
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        help=(
            "deadline of each call (default: 2 for identify and verify, 90 for enroll and"
            " members add-photos, 5 for the rest)"
        ),
    )
    group.add_argument(
        "--json", action="store_true", help="print protobuf JSON (proto field names)"
    )
    tls = common.add_argument_group(
        "credentials", "The bearer token comes from $FACEGATE_TOKEN (a flag would show in ps)."
    )
    tls.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CAs (implied by --ca)"
    )
    for flag, env, what in (
        ("--ca", "FACEGATE_CA", "the CA that signed the server's certificate"),
        ("--cert", "FACEGATE_CERT", "this client's certificate, for mutual TLS"),
        ("--key", "FACEGATE_KEY", "its private key"),
    ):
        tls.add_argument(
            flag, metavar="PEM", default=os.environ.get(env) or None, help=f"{what} (${env})"
        )
    tls.add_argument(
        "--server-name",
        metavar="NAME",
        default=os.environ.get("FACEGATE_SERVER_NAME") or None,
        help="the name the servers' certificates carry, for a target of IP addresses"
        " ($FACEGATE_SERVER_NAME)",
    )
    return common


def _add_client_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    common = _common_options()

    def add(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Handler,
        help_text: str,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser.set_defaults(func=_run_client_command(handler))
        return parser

    enroll = add(subparsers, "enroll", _cmd_enroll, "enrol a new member from photos")
    enroll.add_argument("--member-id", required=True, metavar="ID", help="the new member's id")
    enroll.add_argument("--name", default="", help="the member's display name")
    _membership_options(enroll, update=False)
    enroll.add_argument("photos", nargs="+", metavar="PHOTO", help="photos of one face each")

    add_photos = add(subparsers, "add-photos", _cmd_add_photos, "add photos to an enrolled member")
    add_photos.add_argument("--member-id", required=True, metavar="ID", help="the member's id")
    add_photos.add_argument("photos", nargs="+", metavar="PHOTO", help="photos of one face each")

    identify = add(subparsers, "identify", _cmd_identify, "decide on one camera frame")
    identify.add_argument("frame", metavar="FRAME", help="an image file")
    identify.add_argument(
        "--turnstile-id", default="cli", metavar="ID", help="recorded in the log (default: cli)"
    )

    verify = add(
        subparsers, "verify", _cmd_verify, "decide whether one camera frame shows a given member"
    )
    verify.add_argument(
        "--member-id", required=True, metavar="ID", help="the member claimed (a card, a QR code)"
    )
    verify.add_argument("frame", metavar="FRAME", help="an image file")
    verify.add_argument(
        "--turnstile-id", default="cli", metavar="ID", help="recorded in the log (default: cli)"
    )

    members = subparsers.add_parser(
        "members", help="list, show or delete members", description="Members."
    )
    members_commands = members.add_subparsers(dest="members_command", metavar="COMMAND")
    members_commands.required = True
    members_list = add(members_commands, "list", _cmd_members_list, "list all members")
    members_list.add_argument(
        "--page-size",
        type=_non_negative_int,
        default=100,
        metavar="N",
        help="members fetched per call (default: %(default)s)",
    )
    members_get = add(members_commands, "get", _cmd_members_get, "show one member")
    members_get.add_argument("member_id", metavar="ID")
    members_delete = add(
        members_commands, "delete", _cmd_members_delete, "delete a member and their faces"
    )
    members_delete.add_argument("member_id", metavar="ID")
    members_update = add(
        members_commands,
        "update",
        _cmd_members_update,
        "change a member's name or membership (only the options given)",
    )
    members_update.add_argument("member_id", metavar="ID")
    members_update.add_argument(
        "--name", default=argparse.SUPPRESS, help="the member's display name"
    )
    _membership_options(members_update, update=True)
    suspension = members_update.add_mutually_exclusive_group()
    suspension.add_argument(
        "--suspend", metavar="REASON", help="refuse the member until resumed (REASON: the gym's)"
    )
    suspension.add_argument("--resume", action="store_true", help="lift a suspension")
    members_photos = add(members_commands, "photos", _cmd_members_photos, "list a member's photos")
    members_photos.add_argument("member_id", metavar="ID")
    members_photos.add_argument(
        "--save",
        metavar="DIR",
        help="also write the photos into DIR as ID-PHOTO_ID.jpg (where the server keeps them)",
    )
    members_remove_photo = add(
        members_commands,
        "remove-photo",
        _cmd_members_remove_photo,
        "remove one photo of a member (not their last)",
    )
    members_remove_photo.add_argument("member_id", metavar="ID")
    members_remove_photo.add_argument("photo_id", metavar="PHOTO_ID", type=_non_negative_int)

    events = add(subparsers, "events", _cmd_events, "read the access log, newest first")
    events.add_argument("--member-id", default="", metavar="ID", help="only this member's")
    events.add_argument("--turnstile-id", default="", metavar="ID", help="only this turnstile's")
    events.add_argument(
        "--since",
        type=_iso_time,
        metavar="ISO8601",
        help="only at or after this time (UTC unless an offset is given)",
    )
    events.add_argument(
        "--until",
        type=_iso_time,
        metavar="ISO8601",
        help="only before this time (UTC unless an offset is given)",
    )
    events.add_argument(
        "--decision",
        action="append",
        type=_enum_value(pb.Decision, "DECISION_"),
        metavar="DECISION",
        help="only events with this decision (repeat for several), e.g. DENIED_OUTSIDE_HOURS",
    )
    events.add_argument(
        "--rule",
        type=_enum_value(pb.MembershipRule, "MEMBERSHIP_RULE_"),
        metavar="RULE",
        help="only events refused by this membership rule: NOT_YET_VALID, EXPIRED, "
        "SUSPENDED, OUTSIDE_HOURS, OTHER_SITE",
    )
    events.add_argument(
        "--limit",
        type=_non_negative_int,
        metavar="N",
        help="at most N events, 0 for all (default: 50; with --follow, no limit)",
    )
    events.add_argument(
        "--follow",
        action="store_true",
        help="print the last 10 events, then each one as it is written, until interrupted; "
        "resumes after the last event printed when the server restarts (--json: one object "
        "a line)",
    )
    events.add_argument(
        "--after",
        type=_non_negative_int,
        metavar="ID",
        help="with --follow: start after event ID, 0 for the whole log (default: the last 10)",
    )

    add(subparsers, "status", _cmd_status, "show the server's engines, circuit and outbox")
    sync = add(subparsers, "sync", _cmd_sync, "reconcile the cloud group with the server's members")
    sync.add_argument(
        "--dry-run", action="store_true", help="only show what differs; change nothing"
    )
    sync.add_argument(
        "--retry-parked",
        action="store_true",
        help="instead, put the changes the cloud refused (see `facegate status`) back in line",
    )
    sync.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=600.0,
        metavar="SECONDS",
        help="wait until the reconciliation has finished (at most SECONDS, default 600)"
        " and show its report; without it, sync answers at once with the last finished"
        " one's",
    )


def _membership_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """--valid-from, --valid-until, --hours, --sites: on `enroll` (absent: open) and on
    `members update` (absent: unchanged)."""
    absent = argparse.SUPPRESS if update else None
    group = parser.add_argument_group("membership")
    group.add_argument(
        "--valid-from",
        type=_iso_time_or_none,
        default=absent,
        metavar="ISO8601",
        help="first instant the membership is valid (UTC unless an offset is given"
        + ("; none: no start)" if update else ")"),
    )
    group.add_argument(
        "--valid-until",
        type=_iso_time_or_none,
        default=absent,
        metavar="ISO8601",
        help="first instant it is no longer valid" + ("; none: no end" if update else ""),
    )
    group.add_argument(
        "--hours",
        type=_hours,
        default=absent,
        metavar="SPEC",
        help="access hours in the site's time, e.g. 'Mon-Fri 06:00-16:00; Sat 08:00-12:00'"
        + ("; '' for any time" if update else ""),
    )
    group.add_argument(
        "--sites",
        type=_sites,
        default=absent,
        metavar="A,B",
        help="the sites (FACEGATE_SITE_ID) the member may enter"
        + ("; '' for every site" if update else ""),
    )


def _add_plugin_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            register = entry_point.load()
        except ImportError:
            continue  # the plugin's package is not fully installed: no such command
        register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    """The `facegate` parser: the client commands, then those of installed plugins."""
    parser = argparse.ArgumentParser(
        prog="facegate",
        description="FaceGate: enrol members, identify faces, read the access log.",
        epilog=_EPILOG,
    )
    try:
        version = importlib.metadata.version("facegate-client")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"facegate-client {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_client_commands(subparsers)
    _add_plugin_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `facegate` with `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors (2)
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        return 2
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
