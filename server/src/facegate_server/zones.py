"""IANA time zones from the `tzdata` package, not the machine's /usr/share/zoneinfo, so a
server decides access hours the same wherever it runs (config.py checks the setting with
this; membership.py reads the site's time in it). Imports nothing heavy."""

from __future__ import annotations

import re
from importlib import resources
from zoneinfo import ZoneInfo

_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")


class UnknownTimeZone(ValueError):
    """Not an IANA time zone name that the tzdata package knows."""


def load_zone(name: str) -> ZoneInfo:
    """The IANA zone `name` (e.g. "Europe/Berlin") from the tzdata package."""
    if not _ZONE_NAME.fullmatch(name):
        raise UnknownTimeZone(f"not an IANA time zone name: {name!r}")
    parts = name.split("/")
    try:
        with resources.files("tzdata.zoneinfo").joinpath(*parts).open("rb") as data:
            return ZoneInfo.from_file(data, key=name)
    except (OSError, ValueError):
        raise UnknownTimeZone(f"not an IANA time zone the tzdata package knows: {name!r}") from None
