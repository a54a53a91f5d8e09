"""Membership and face quality as JSON, for the store (times as UTC microseconds)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from facegate_server.domain import AccessWindow, FaceQuality, Membership

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(t: datetime | None) -> int | None:
    return None if t is None else (t - _EPOCH) // timedelta(microseconds=1)


def _time(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


def membership_json(m: Membership) -> str:
    return json.dumps(
        {
            "valid_from_us": _us(m.valid_from),
            "valid_until_us": _us(m.valid_until),
            "suspended": m.suspended,
            "suspension_reason": m.suspension_reason,
            "access_hours": [[w.day, w.start, w.end] for w in m.access_hours],
            "sites": list(m.sites),
        },
        separators=(",", ":"),
    )


def membership_from_json(text: str) -> Membership:
    items: dict[str, Any] = json.loads(text or "{}")
    return Membership(
        valid_from=_time(items.get("valid_from_us")),
        valid_until=_time(items.get("valid_until_us")),
        suspended=bool(items.get("suspended", False)),
        suspension_reason=str(items.get("suspension_reason", "")),
        access_hours=tuple(AccessWindow(*w) for w in items.get("access_hours", ())),
        sites=tuple(items.get("sites", ())),
    )


def quality_json(q: FaceQuality | None) -> str | None:
    if q is None:
        return None
    return json.dumps(
        {
            "size": q.size,
            "sharpness": q.sharpness,
            "brightness": q.brightness,
            "yaw": q.yaw,
            "pitch": q.pitch,
        }
    )


def quality_from_json(text: str | None) -> FaceQuality | None:
    if text is None:
        return None
    return FaceQuality(**json.loads(text))
