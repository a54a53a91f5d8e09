"""The membership rules: may a recognised member come in, here and now?

The gate applies them after recognition (gate.py `Gate._admit`), on the store's copy of the
member, with the cloud or without. They are checked in this order, and the first that
refuses names the decision:

1. validity: `valid_from` <= now < `valid_until` (either open): NOT_YET_VALID, EXPIRED;
2. suspension: SUSPENDED;
3. branches: the server's site (FACEGATE_SITE_ID) is one of the member's `sites`, or they
   have none: OTHER_SITE (a server without a site id refuses members limited to sites);
4. access hours: the site's local wall-clock time falls in one of the weekly windows, or
   they have none: OUTSIDE_HOURS.

Time is the server's clock (an instant, UTC) read in the site's time zone (an IANA name,
FACEGATE_SITE_TIME_ZONE), from the `tzdata` package rather than the machine's files, so a
server decides the same wherever it runs. A window is local wall-clock time, so across a
daylight-saving change it keeps its local hours: in the spring-forward gap the missing
times simply do not occur (a window 02:00-03:00 on that day is empty), and in the autumn
overlap both instants of a repeated time are inside a window that holds that time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from facegate_server.domain import AccessWindow, Decision, Membership, MembershipRule
from facegate_server.zones import UnknownTimeZone, load_zone

__all__ = ["DECISIONS", "HINTS", "Site", "UnknownTimeZone", "load_zone", "refusal"]

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MINUTES_A_DAY = 24 * 60

DECISIONS: dict[MembershipRule, Decision] = {
    MembershipRule.NOT_YET_VALID: Decision.DENIED_MEMBERSHIP_INACTIVE,
    MembershipRule.EXPIRED: Decision.DENIED_MEMBERSHIP_INACTIVE,
    MembershipRule.SUSPENDED: Decision.DENIED_MEMBERSHIP_INACTIVE,
    MembershipRule.OUTSIDE_HOURS: Decision.DENIED_OUTSIDE_HOURS,
    MembershipRule.OTHER_SITE: Decision.DENIED_OTHER_SITE,
}
"""The decision each rule gives."""

HINTS: dict[MembershipRule, str] = {
    MembershipRule.NOT_YET_VALID: "your membership has not started yet: please see the front desk",
    MembershipRule.EXPIRED: "your membership has expired: please see the front desk",
    MembershipRule.SUSPENDED: "your membership is on hold: please see the front desk",
    MembershipRule.OUTSIDE_HOURS: "your membership does not include this time of day",
    MembershipRule.OTHER_SITE: "your membership is for another branch: please see the front desk",
}
"""What the turnstile can show (never the suspension's reason: others may be watching)."""


@dataclass(frozen=True)
class Site:
    """Where a server's turnstiles are: its branch id ("" none) and its time zone."""

    site_id: str = ""
    zone: ZoneInfo | None = None
    """None: UTC."""

    def local(self, now: datetime) -> datetime:
        return now.astimezone(self.zone) if self.zone is not None else now


def in_window(window: AccessWindow, local: datetime) -> bool:
    """Whether a local wall-clock time falls in a weekly window (see AccessWindow)."""
    minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
    day = local.weekday()
    if window.end > window.start:
        return day == window.day and window.start <= minute < window.end
    # Crosses midnight: the evening of its day, and the early morning of the next.
    if day == window.day and minute >= window.start:
        return True
    return day == (window.day + 1) % 7 and minute < window.end


def refusal(membership: Membership, now: datetime, site: Site) -> MembershipRule | None:
    """The first rule that refuses the member at `now` (an aware instant), or None."""
    if membership.valid_from is not None and now < membership.valid_from:
        return MembershipRule.NOT_YET_VALID
    if membership.valid_until is not None and now >= membership.valid_until:
        return MembershipRule.EXPIRED
    if membership.suspended:
        return MembershipRule.SUSPENDED
    if membership.sites and site.site_id not in membership.sites:
        return MembershipRule.OTHER_SITE
    if membership.access_hours:
        local = site.local(now)
        if not any(in_window(w, local) for w in membership.access_hours):
            return MembershipRule.OUTSIDE_HOURS
    return None


def format_window(window: AccessWindow) -> str:
    """`Mon 06:00-16:00` (an end of 1440 is 24:00)."""

    def hhmm(minutes: int) -> str:
        return f"{minutes // 60:02d}:{minutes % 60:02d}"

    return f"{DAYS[window.day]} {hhmm(window.start)}-{hhmm(window.end)}"
