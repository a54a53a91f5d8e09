"""Checks of request fields that need no image decoding."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace

from facegate_server.domain import Membership
from facegate_server.errors import InvalidArgument

MEMBER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
TURNSTILE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_DISPLAY_NAME = 200
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f"
    + "".join(map(chr, range(0x202A, 0x202F)))
    + "".join(map(chr, range(0x2066, 0x206A)))
)
"""The bidirectional controls (the Arabic letter mark, the left-to-right and right-to-left
marks, the embeddings, overrides and isolates): they reorder the text around them where it
is shown, so a name could display as something else. The joiners (U+200C, U+200D), which
Persian and Indic names need, are kept."""


def member_id(value: str, field: str = "member_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required", reason="MEMBER_ID_MISSING")
    if len(value) > 64:
        raise InvalidArgument(
            field,
            f"is {len(value)} characters long; at most 64 are allowed",
            reason="MEMBER_ID_TOO_LONG",
        )
    if not MEMBER_ID.fullmatch(value):
        raise InvalidArgument(
            field, "may hold only letters, digits and . _ : @ -", reason="MEMBER_ID_INVALID"
        )
    return value


def turnstile_id(value: str) -> str:
    if not value:
        raise InvalidArgument("turnstile_id", "is required", reason="TURNSTILE_ID_MISSING")
    if not TURNSTILE_ID.fullmatch(value):
        raise InvalidArgument(
            "turnstile_id",
            "must be 1 to 64 letters, digits or . _ : -",
            reason="TURNSTILE_ID_INVALID",
        )
    return value


def display_name(value: str) -> str:
    if len(value) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            "display_name",
            f"is {len(value)} characters long; at most {MAX_DISPLAY_NAME} are allowed",
            reason="DISPLAY_NAME_TOO_LONG",
        )
    for i, c in enumerate(value):
        if unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS:
            raise InvalidArgument(
                "display_name",
                f"must not contain control characters (U+{ord(c):04X} at {i})",
                reason="DISPLAY_NAME_INVALID",
            )
    return value


def photo_count(count: int, limit: int) -> None:
    if count == 0:
        raise InvalidArgument("photos", "at least one photo is required", reason="PHOTOS_MISSING")
    if count > limit:
        raise InvalidArgument(
            "photos", f"{count} photos sent; at most {limit} are allowed", reason="TOO_MANY_PHOTOS"
        )


def page_size(value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(
            "page_size", f"must be between 0 and {MAX_PAGE_SIZE}", reason="PAGE_SIZE_INVALID"
        )
    return value or DEFAULT_PAGE_SIZE


MAX_REASON = 200
MAX_WINDOWS = 50
MAX_SITES = 50
SITE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def membership(value: Membership, field: str = "membership") -> Membership:
    """A membership's fields, checked; the reason is dropped when not suspended."""
    if (
        value.valid_from is not None
        and value.valid_until is not None
        and value.valid_until <= value.valid_from
    ):
        raise InvalidArgument(
            f"{field}.valid_until", "must be after valid_from", reason="VALIDITY_INVALID"
        )
    reason = value.suspension_reason
    if len(reason) > MAX_REASON or any(ord(c) < 32 or ord(c) == 127 for c in reason):
        raise InvalidArgument(
            f"{field}.suspension_reason",
            f"must be at most {MAX_REASON} characters, without control characters",
            reason="SUSPENSION_REASON_INVALID",
        )
    if len(value.access_hours) > MAX_WINDOWS:
        raise InvalidArgument(
            f"{field}.access_hours",
            f"at most {MAX_WINDOWS} windows are allowed",
            reason="ACCESS_HOURS_INVALID",
        )
    for i, w in enumerate(value.access_hours):
        if not (0 <= w.day <= 6 and 0 <= w.start < 1440 and 0 < w.end <= 1440) or w.start == w.end:
            raise InvalidArgument(
                f"{field}.access_hours[{i}]",
                "needs a day (Monday to Sunday), a start of 0 to 1439 minutes after midnight "
                "and a different end of 1 to 1440 (at or before the start: the next day)",
                reason="ACCESS_HOURS_INVALID",
            )
    if len(value.sites) > MAX_SITES:
        raise InvalidArgument(
            f"{field}.sites", f"at most {MAX_SITES} sites are allowed", reason="SITES_INVALID"
        )
    for i, site in enumerate(value.sites):
        if not SITE_ID.fullmatch(site):
            raise InvalidArgument(
                f"{field}.sites[{i}]",
                "must be 1 to 64 letters, digits or . _ : -",
                reason="SITES_INVALID",
            )
    return replace(
        value,
        suspension_reason=reason if value.suspended else "",
        sites=tuple(dict.fromkeys(value.sites)),
    )
