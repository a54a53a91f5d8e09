"""FaceGate's Azure Face API v1.0 emulator: real recognition, latency and faults on loopback.

    from facegate_azure_emulator import EmulatorSettings, start_emulator

    with start_emulator(EmulatorSettings(key="k", training_seconds=0)) as emu:
        client = FaceClient(emu.endpoint, CognitiveServicesCredentials("k"))
        emu.admin.set_fault("throttle")
        emu.admin.counts()   # {"Face_DetectWithStream": 3, ...}

See README.md beside this file. The names below are imported on first use, so that the
`facegate` command (which registers `azure-emulator` through emulator.cli) does not load
aiohttp and numpy for every other command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facegate_azure_emulator.clock import ManualClock
    from facegate_azure_emulator.faults import FaultMode, FaultSettings, LatencyProfile
    from facegate_azure_emulator.recognizer import Recognizer
    from facegate_azure_emulator.server import (
        EmulatorAdmin,
        EmulatorSettings,
        RunningEmulator,
        start_emulator,
    )
    from facegate_azure_emulator.state import Limits

_HOMES = {
    "ManualClock": "clock",
    "FaultMode": "faults",
    "FaultSettings": "faults",
    "LatencyProfile": "faults",
    "Recognizer": "recognizer",
    "EmulatorAdmin": "server",
    "EmulatorSettings": "server",
    "RunningEmulator": "server",
    "start_emulator": "server",
    "Limits": "state",
}

__all__ = [
    "EmulatorAdmin",
    "EmulatorSettings",
    "FaultMode",
    "FaultSettings",
    "LatencyProfile",
    "Limits",
    "ManualClock",
    "Recognizer",
    "RunningEmulator",
    "start_emulator",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
