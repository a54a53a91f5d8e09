"""Access hours as people write them, and memberships as people read them.

    parse_hours("Mon-Fri 06:00-16:00; Sat 08:00-12:00")   # -> [AccessWindow, ...]
    format_hours(windows)                                  # -> "Mon-Fri 06:00-16:00; Sat ..."

A window is a day or a range of days (Mon-Fri, Sat-Sun, Fri-Mon wraps) or a list of them
(Mon,Wed,Fri), then HH:MM-HH:MM of the site's local time. An end at or before the start
crosses midnight and belongs to the day it starts (`Fri 22:00-02:00` admits at 01:00 on
Saturday); 24:00 is the end of the day. An empty text is "any time" (no windows).
"""

from __future__ import annotations

import re
from datetime import UTC

from facegate.v1 import facegate_service_pb2 as pb

__all__ = ["DAYS", "format_hours", "format_membership", "parse_hours"]

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_TIME = re.compile(r"(\d{1,2}):(\d{2})")


def _minutes(text: str, *, end: bool) -> int:
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"not a time HH:MM: {text!r}")
    hours, minutes = int(match[1]), int(match[2])
    value = hours * 60 + minutes
    if minutes > 59 or value > 1440 or (value == 1440 and not end):
        raise ValueError(f"not a time of day: {text!r}")
    return value


def _day(text: str) -> int:
    for i, name in enumerate(DAYS):
        if text.strip().lower() == name.lower():
            return i
    raise ValueError(f"not a day (Mon ... Sun): {text!r}")


def _days(text: str) -> list[int]:
    days: list[int] = []
    for part in text.split(","):
        if "-" in part:
            first, last = (_day(p) for p in part.split("-", 1))
            days.extend((first + i) % 7 for i in range((last - first) % 7 + 1))
        else:
            days.append(_day(part))
    return list(dict.fromkeys(days))


def parse_hours(text: str) -> list[pb.AccessWindow]:
    """Windows from `Mon-Fri 06:00-16:00; Sat 08:00-12:00` (ValueError if malformed)."""
    windows: list[pb.AccessWindow] = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        try:
            days, times = spec.rsplit(None, 1)
            start_text, end_text = times.split("-")
        except ValueError:
            raise ValueError(f"not DAYS HH:MM-HH:MM: {spec!r}") from None
        start, end = _minutes(start_text, end=False), _minutes(end_text, end=True)
        if start == end:
            raise ValueError(f"a window must not end when it starts: {spec!r}")
        for day in _days(days):
            windows.append(
                pb.AccessWindow(
                    day=pb.DayOfWeek.ValueType(day + 1), start_minute=start, end_minute=end
                )
            )
    return windows


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def format_hours(windows: list[pb.AccessWindow]) -> str:
    """`Mon-Fri 06:00-16:00; Sat 08:00-12:00`: consecutive days with the same hours as one
    range; "any time" when there are none."""
    if not windows:
        return "any time"
    by_hours: dict[tuple[int, int], list[int]] = {}
    for w in windows:
        by_hours.setdefault((w.start_minute, w.end_minute), []).append(int(w.day) - 1)
    parts = []
    for (start, end), days in by_hours.items():
        runs: list[list[int]] = []
        for day in sorted(set(days)):
            if runs and runs[-1][-1] == day - 1:
                runs[-1].append(day)
            else:
                runs.append([day])
        names = ",".join(DAYS[r[0]] if len(r) == 1 else f"{DAYS[r[0]]}-{DAYS[r[-1]]}" for r in runs)
        parts.append(f"{names} {_hhmm(start)}-{_hhmm(end)}")
    return "; ".join(parts)


def format_membership(m: pb.Membership) -> list[str]:
    """`valid: 2026-01-01T00:00:00Z to 2026-12-31T23:00:00Z`, `suspended: unpaid` ... lines."""

    def when(field: str) -> str:
        if not m.HasField(field):  # type: ignore[arg-type]
            return "-"
        stamp = getattr(m, field).ToDatetime(tzinfo=UTC)
        return str(stamp.strftime("%Y-%m-%dT%H:%M:%SZ"))

    lines = [f"valid: from {when('valid_from')} until {when('valid_until')}"]
    if m.suspended:
        lines.append(f"suspended: {m.suspension_reason or 'yes'}")
    lines.append(f"hours: {format_hours(list(m.access_hours))} (site time)")
    lines.append(f"sites: {', '.join(m.sites) if m.sites else 'all'}")
    return lines
