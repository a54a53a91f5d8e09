"""Is the cloud usable? The readiness check, and the switch that turns the cloud off.

The check (at start-up, in the background; again whenever the cloud is off or its outbox
paused, on the replayer's back-off) asks three questions, each answered with what to do:
- is the key valid (the group can be read: not a 401);
- is the resource approved for identification (Limited Access): a detect asking for a
  faceId is not refused (403 UnsupportedFeature, in either form) and, when it finds a
  face, returns its faceId;
- is the group's recognition model the one configured (faces detected with one model
  cannot be identified in a group of another).

A Limited Access refusal, a detect without faceId, or a model mismatch turns the cloud
OFF: no transaction is spent, by Identify or the outbox, until the check passes again. A
resource fault (key, quota) PAUSES the outbox with its reason; the doors' circuit breaker
handles Identify.
"""

from __future__ import annotations

import enum
import io
import logging
import threading
from dataclasses import dataclass

from facegate_server.cloud.azure import AzureFace, CloudFailure

log = logging.getLogger(__name__)

APPLY = (
    "apply for Limited Access (Identification) at https://aka.ms/facerecognition, or use a"
    " resource that has it; the local engine decides meanwhile"
)


class Readiness(enum.Enum):
    UNKNOWN = "checking"
    READY = "ready"
    PAUSED = "paused"  # the outbox waits for an operator (key, quota)
    OFF = "off"  # no transactions at all (Limited Access, model mismatch)


@dataclass(frozen=True)
class HealthState:
    readiness: Readiness
    reason: str = ""
    advice: str = ""

    def describe(self) -> str:
        text = self.readiness.value
        if self.reason:
            text += f": {self.reason}"
        if self.advice:
            text += f" ({self.advice})"
        return text


class CloudHealth:
    """The cloud's readiness, shared by the engine (which skips an OFF cloud) and the
    replayer (which runs the check and pauses)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = HealthState(Readiness.UNKNOWN)
        self._probe: bytes | None = None

    @property
    def state(self) -> HealthState:
        with self._lock:
            return self._state

    @property
    def off(self) -> bool:
        return self.state.readiness is Readiness.OFF

    def set(self, state: HealthState) -> None:
        with self._lock:
            before, self._state = self._state, state
        if before != state:
            level = logging.INFO if state.readiness is Readiness.READY else logging.ERROR
            log.log(level, "cloud " + state.describe())

    def failed(self, failure: CloudFailure, frame: bytes | None = None) -> None:
        """A call met a fault of the resource: turn the cloud off or pause it, saying why.
        `frame` (the image whose detect had no faceId) is kept, in memory only, to probe
        with: a faceless probe cannot show that faceIds are back."""
        if failure.limited_access:
            with self._lock:
                if frame is not None:
                    self._probe = frame
            self.set(HealthState(Readiness.OFF, failure.detail, APPLY))
        elif failure.resource_fault:
            self.set(HealthState(Readiness.PAUSED, failure.detail, advice_for(failure)))

    def probe(self) -> bytes:
        with self._lock:
            return self._probe if self._probe is not None else blank_probe()

    def check(self, face: AzureFace) -> HealthState:
        """Run the readiness check (two transactions); CloudFailure when the cloud cannot be
        reached (the state is then left as it was)."""
        try:
            model = face.group_model()
            if model and model != face.settings.recognition_model:  # "": not reported
                state = HealthState(
                    Readiness.OFF,
                    f"the group {face.settings.group_id!r} uses {model}, FaceGate is configured"
                    f" for {face.settings.recognition_model}",
                    f"set FACEGATE_AZURE_RECOGNITION_MODEL={model}, or a new"
                    " FACEGATE_AZURE_GROUP_ID",
                )
                self.set(state)
                return state
            face.detect(self.probe(), face.settings.read_timeout, urgent=False)
        except CloudFailure as failure:
            if not (failure.limited_access or failure.resource_fault):
                raise
            self.failed(failure)
            return self.state
        with self._lock:
            self._probe = None
        state = HealthState(Readiness.READY)
        self.set(state)
        return state


def advice_for(failure: CloudFailure) -> str:
    if failure.status == 401:
        return "check FACEGATE_AZURE_KEY and that FACEGATE_AZURE_ENDPOINT is that key's resource"
    if failure.status == 403 and "quota" in failure.detail.lower():
        return (
            "the resource's call volume quota is spent: wait for it to be replenished, or move"
            " the resource to S0 (FACEGATE_AZURE_TIER=S0)"
        )
    if failure.status == 403:
        return "the resource refuses the key: check the resource's access and network rules"
    return "see the detail"


_BLANK: bytes | None = None


def blank_probe() -> bytes:
    """A faceless JPEG over the Face API's 1 KB minimum: enough to learn whether a detect
    asking for faceIds is refused."""
    global _BLANK
    if _BLANK is None:
        import numpy as np
        from PIL import Image

        noise = np.random.default_rng(11).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(noise).save(out, "JPEG", quality=90)
        _BLANK = out.getvalue()
    return _BLANK
