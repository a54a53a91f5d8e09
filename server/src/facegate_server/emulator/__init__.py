"""FaceGate's Azure Face API v1.0 emulator: real recognition, latency and faults on loopback.

    from facegate_server.emulator import EmulatorSettings, start_emulator

    with start_emulator(EmulatorSettings(key="k", training_seconds=0)) as emu:
        client = FaceClient(emu.endpoint, CognitiveServicesCredentials("k"))
        emu.admin.set_fault("throttle")
        emu.admin.counts()   # {"Face_DetectWithStream": 3, ...}

See README.md beside this file.
"""

from facegate_server.emulator.clock import ManualClock
from facegate_server.emulator.faults import FaultMode, FaultSettings, LatencyProfile
from facegate_server.emulator.recognizer import Recognizer
from facegate_server.emulator.server import (
    EmulatorAdmin,
    EmulatorSettings,
    RunningEmulator,
    start_emulator,
)
from facegate_server.emulator.state import Limits

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
