"""Checks of request fields that need no image decoding."""

from __future__ import annotations

import re
import unicodedata

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
