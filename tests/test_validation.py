"""Request fields checked without an image: display names."""

from __future__ import annotations

import pytest
from facegate_server import validation
from facegate_server.errors import InvalidArgument

C0 = [chr(c) for c in range(0x20)] + ["\x7f"]
C1 = [chr(c) for c in range(0x80, 0xA0)]
BIDI = [
    "\u061c",
    "\u200e",
    "\u200f",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
]


@pytest.mark.parametrize("control", C0 + C1 + BIDI, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_character_is_refused(control: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validation.display_name(f"a{control}b")
    assert (refused.value.field, refused.value.reason) == ("display_name", "DISPLAY_NAME_INVALID")
    assert f"U+{ord(control):04X}" in refused.value.message


@pytest.mark.parametrize(
    "name",
    [
        "a\u009b31mRED",  # a C1 CSI: a terminal would colour what follows
        "a\u0085b",  # NEL, a C1 line break
        "Ali\u202ecod.exe",  # RIGHT-TO-LEFT OVERRIDE: shows as "Aliexe.doc"
    ],
)
def test_the_names_the_issue_found_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validation.display_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Kim Jiwoo",
        "Zoë O'Brien-Ångström",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a ZWNJ
        "\u0915\u094d\u200d\u0937",  # Devanagari, with a ZWJ
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # an emoji family (ZWJ sequence)
        "n" * validation.MAX_DISPLAY_NAME,
    ],
)
def test_ordinary_names_and_the_joiners_are_kept(name: str) -> None:
    assert validation.display_name(name) == name
